"""Memory for bulk work: Python's cyclic garbage collector paused around it, and large
reusable buffers that cost only the pages they touch.

A commit or a restore of a large dot makes hundreds of thousands of small objects that hold
no cycles (block ids, index rows, locations, tree rows). Each of them counts towards the
collector's next pass, and every third or so pass walks everything alive, which by then is the
whole block list: py-spy put 5% of a first commit's and of a full restore's samples in
``gc_collect_main``. Reference counting frees these objects as before; only cycles wait for
the end of the block (when the collector runs as usual again).
"""

from __future__ import annotations

import gc
import mmap
from collections.abc import Iterator
from contextlib import contextmanager

_one_shot = False  # this process runs one command and exits (see one_shot)


def one_shot() -> None:
    """Say that this process runs one command and then exits (``dm``, a daemon's child): the
    objects a block leaves need no collection (see :func:`no_cycle_gc`), nor at exit."""
    global _one_shot
    _one_shot = True


def long_running() -> None:
    """Say that this process serves for a long time (a hub, the web UI, the Docker plugin, a
    mount): cycles made in blocks are collected as usual after each."""
    global _one_shot
    _one_shot = False
    if _grown:  # a heap readied for one command (own_memory) gives memory back again
        _heap_defaults()


def _heap_defaults() -> None:
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD):
        mallopt(param, 128 << 10)  # glibc's starting values


@contextmanager
def no_cycle_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was after: nesting is fine)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if _one_shot and not gc.get_freeze_count():
                # What the block made is moved to the oldest generation as it is,
                # uncollected: counted as new, it would make the next allocation run a full
                # collection over it (0.1-0.4 s after a walk of 200,000 files, whose objects
                # are mostly alive). Only where the process ends soon: a long-running one
                # (a server, an app using the API) would then keep the block's cycles until
                # something else starts a full collection; and a process that froze its
                # own heap (before forking) keeps it frozen.
                gc.freeze()
                gc.unfreeze()
            gc.enable()


HUGE_PAGE = 2 << 20


def private_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of ``size`` bytes whose pages are only made when touched
    (a bytearray is zeroed at once: 25-36 ms for 32 MiB here, paid by every small command).
    Private, not mmap's default MAP_SHARED: a forked child gets its own copy, where a shared
    one had two children writing files through the same memory."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE:
        # Transparent huge pages where the kernel lets a program ask ("madvise" mode): a
        # fresh page costs a fault, and faults are this VM's dearest work (clear_page was
        # 30% of a 1% commit's samples); one 2 MiB fault instead of 512 of 4 KiB
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP in this kernel: small pages, as before
            pass
    return buf


_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in writable (copies shared ones) at once
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_WINDOW = 256 << 20  # of a mapping looked at (mincore's vector: a byte per page)
_MOST = 512 << 20  # copied at most
_grown = False  # own_memory changed the C heap's settings (see long_running)
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore's byte per page: its low bit says


def own_memory(grow: int = 32 << 20) -> int:
    """Ready a process forked ahead of its work (the daemon's spare) while nothing waits on it;
    returns the bytes of resident memory it made its own (the parent's pages, copied).

    A forked command shares every page with its parent until it writes there, and each first
    write is a fault that copies a page (reference counts are writes: the command touches most
    of the daemon's 40 MB of modules and objects); every page it allocates afresh is a fault
    that zeroes one. A btrfs 1% commit in a fresh fork made 22,000 faults against 7,000 in a
    process that had run one before, and took 0.36 s against 0.30 s. So: copy now what the
    parent had resident (``MADV_POPULATE_WRITE``; anonymous memory only, the pages ``mincore``
    finds there, so no reserved but untouched memory is made; _MOST bytes at most), and give
    the C heap ``grow`` bytes of touched room that later frees do not hand back (until
    :func:`long_running`). Best effort: where the kernel or the C library lacks a call, the
    work just faults as before."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore = libc.madvise, libc.mincore
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    copied = 0
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        maps = []
    for line in maps:
        fields = line.split()
        # anonymous memory only (a private file mapping's residency is its file's)
        if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5
                                                      and fields[5] != "[heap]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        for lo in range(start, end, _WINDOW):  # a bounded vector, however sparse the map
            hi = min(end, lo + _WINDOW)
            pages = (hi - lo) // page
            resident = ctypes.create_string_buffer(pages)
            if mincore(lo, hi - lo, resident) != 0:
                break
            there = resident.raw.translate(_LOW_BIT)  # b"\x01" where a page is resident
            i = there.find(1)
            while i >= 0 and copied < _MOST:  # each run of resident pages, in one call
                j = there.find(0, i)
                j = pages if j < 0 else j
                if madvise(lo + i * page, (j - i) * page, _MADV_POPULATE_WRITE) == 0:
                    copied += (j - i) * page
                i = there.find(1, j)
    if grow > 0:
        global _grown
        mallopt, malloc, free = libc.mallopt, libc.malloc, libc.free
        malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        free.argtypes = [ctypes.c_void_p]
        _grown = True
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # buffers up to 32 MiB from the heap ...
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)  # ... which keeps what is freed
        mallopt(_M_TOP_PAD, 16 << 20)
        piece = 8 << 20
        blocks = [malloc(piece) for _ in range(grow // piece)]
        for p in blocks:
            if p:
                ctypes.memset(p, 0, piece)
        for p in blocks:
            if p:
                free(p)
    return copied
