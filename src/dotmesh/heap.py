"""Pausing Python's cyclic garbage collector around bulk work.

A commit or a restore of a large dot makes hundreds of thousands of small objects that hold
no cycles (block ids, index rows, locations, tree rows). Each of them counts towards the
collector's next pass, and every third or so pass walks everything alive, which by then is the
whole block list: py-spy put 5% of a first commit's and of a full restore's samples in
``gc_collect_main``. Reference counting frees these objects as before; only cycles wait for
the end of the block (when the collector runs as usual again).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_cycle_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was after: nesting is fine)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
