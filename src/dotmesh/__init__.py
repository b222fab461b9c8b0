"""dotmesh: git for application state."""

from dotmesh.version import FORMAT_VERSION, __version__

__all__ = ["FORMAT_VERSION", "__version__"]
