import mmap

def read_runs(fd: int, buffer: bytearray | mmap.mmap | memoryview,
              runs: list[tuple[int, int, int]], advise: bool, /) -> int:
    """Bytes read; ValueError for a run that does not fit the buffer, OSError for a read."""
