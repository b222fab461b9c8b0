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
