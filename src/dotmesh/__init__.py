"""dotmesh: git for application state."""

__version__ = "0.1.0"
FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "__version__"]
