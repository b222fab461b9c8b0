"""The program's version and the store format it writes (the bottom layer: anyone may read it)."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
