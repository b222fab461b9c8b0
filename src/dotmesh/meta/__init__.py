"""SQLite metadata: dots, subdots, branches, reflog, stat cache, object index."""
