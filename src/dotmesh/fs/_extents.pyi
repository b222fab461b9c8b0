def items(body: bytes | bytearray | memoryview, count: int, ino: int, /
          ) -> tuple[list[tuple[int, int, int, int]], int]: ...

_Extent = tuple[int, int, int, int]

def common(old: list[_Extent], new: list[_Extent], /
           ) -> tuple[list[_Extent], list[_Extent], list[_Extent]]:
    """ValueError for a map out of order; TypeError for anything but tuples of ints."""
