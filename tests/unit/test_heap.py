"""The cyclic collector around big walks: off during them, and no full collection after."""

from __future__ import annotations

import gc
import weakref

import pytest

from dotmesh.cli import main as cli_main
from dotmesh.heap import no_cycle_gc


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_what_the_block_made_does_not_start_a_collection_after_it():
    """A walk of 200,000 files leaves about a million objects, mostly alive: counted as
    new when the collector is back, the next allocation would examine them all."""
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
    assert collections == []
    assert len(kept) == 200_000 and len(after) == 100


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
    monkeypatch.setattr(cli_main, "run", lambda: 3)
    try:
        with pytest.raises(SystemExit) as e:
            cli_main.main()
        assert e.value.code == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
