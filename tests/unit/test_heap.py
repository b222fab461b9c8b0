"""The cyclic collector around big walks: off during them, and no full collection after."""

from __future__ import annotations

import gc
import weakref

import pytest

from dotmesh import heap
from dotmesh.cli import main as cli_main
from dotmesh.heap import no_cycle_gc


class _Node:
    def __init__(self) -> None:
        self.me = self


def _collections_after_a_block() -> list[int]:
    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with no_cycle_gc():
            kept = [[i] for i in range(200_000)]
        after = [[] for _ in range(100)]  # the collector is back; these are counted
    finally:
        gc.callbacks.remove(seen)
    assert gc.isenabled()
    assert len(kept) == 200_000 and len(after) == 100
    return collections


def test_in_a_command_what_the_block_made_starts_no_collection_after_it(monkeypatch):
    """A walk of 200,000 files leaves about a million objects, mostly alive: counted as
    new when the collector is back, the next allocation would examine them all."""
    monkeypatch.setattr(heap, "_one_shot", True)
    assert _collections_after_a_block() == []


def test_in_a_server_the_block_leaves_its_objects_to_the_collector(monkeypatch):
    """A long-running process collects a block's cycles as usual: frozen and unfrozen,
    they would wait for a full collection that such a heap may not start for hours."""
    monkeypatch.setattr(heap, "_one_shot", False)
    assert _collections_after_a_block() != []


def test_a_heap_frozen_by_its_process_stays_frozen(monkeypatch):
    monkeypatch.setattr(heap, "_one_shot", True)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with no_cycle_gc():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_cycle_made_in_the_block_is_still_collected():
    with no_cycle_gc():
        node = _Node()
        gone = weakref.ref(node)
        del node
        assert gone() is not None  # a cycle: only the collector frees it
    gc.collect()
    assert gone() is None


def test_nested_blocks_leave_the_collector_as_they_found_it():
    gc.disable()
    try:
        with no_cycle_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_command_line_spares_python_its_exit_collection(monkeypatch):
    monkeypatch.setattr(heap, "_one_shot", False)  # main() sets it: restored after
    monkeypatch.setattr(cli_main, "run", lambda: 3)
    try:
        with pytest.raises(SystemExit) as e:
            cli_main.main()
        assert e.value.code == 3
        assert gc.get_freeze_count() > 0
        assert heap._one_shot
    finally:
        gc.unfreeze()


def _faults_writing_in_a_child(inherited: bytearray, ready: bool) -> int:
    """Minor faults a forked child takes writing one byte per page of ``inherited``."""
    import os
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if ready:
                heap.own_memory(grow=0)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(0, len(inherited), 4096):
                inherited[i] = 2
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            os.write(w, str(faults).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        return int(os.read(r, 64) or b"-1")
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_a_readied_child_writes_its_parents_pages_without_a_fault_each() -> None:
    """own_memory copies what the parent had resident at once (MADV_POPULATE_WRITE), so the
    child's writes there fault no more; nothing is made where the parent had no pages."""
    pages = 2048
    inherited = bytearray(b"\1" * (pages * 4096))  # 8 MiB, every page resident
    assert _faults_writing_in_a_child(inherited, ready=False) >= pages * 0.9
    assert _faults_writing_in_a_child(inherited, ready=True) < pages * 0.1


def test_readying_makes_no_memory_the_parent_did_not_have() -> None:
    """A sparse mapping (4 GiB reserved, one page touched) is not filled in: the child's
    resident memory grows by what the parent had resident, not by what it reserved."""
    import mmap
    import os

    sparse = mmap.mmap(-1, 4 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    sparse[0] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)

            def rss() -> int:
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * mmap.PAGESIZE

            before = rss()
            heap.own_memory(grow=0)
            os.write(w, str(rss() - before).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        grew = int(os.read(r, 64) or b"-1")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
        sparse.close()
    assert 0 <= grew < 1 << 30
