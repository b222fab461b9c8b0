"""Content-addressed storage: chunking, pack files and their index."""
