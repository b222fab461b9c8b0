def items(body: bytes | bytearray | memoryview, count: int, ino: int, /
          ) -> tuple[list[tuple[int, int, int, int]], int]: ...

_Extent = tuple[int, int, int, int]

def common(old: list[_Extent], new: list[_Extent], /
           ) -> tuple[list[_Extent], list[_Extent], list[_Extent]]:
    """ValueError for a map out of order; TypeError for anything but tuples of ints."""

def ioctl(fd: int, request: int, buf: bytearray | memoryview, /) -> int:
    """fcntl.ioctl on a writable buffer, with the GIL released; OSError from errno."""

def inodes_since(body: bytes | bytearray | memoryview, count: int, since: int, /
                 ) -> tuple[list[int], list[int], int]: ...

def changed_inodes(fd: int, since: int, /) -> tuple[list[int], list[int]]: ...
