"""The Docker volume plugin: ``dm serve``."""
