"""The program's version and the store format it writes (the bottom layer: anyone may read it)."""

__version__ = "0.1.0"
FORMAT_VERSION = 2  # 2: the object index's side table of recent rows (meta/index.py)
