"""A snapshot updated from inotify's names equals a snapshot taken from scratch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dotmesh.capture.changes import ChangeWatcher
from dotmesh.meta.db import connect
from dotmesh.store.packs import PackStore
from dotmesh.workdir.snapshot import snapshot, update

NAMES = ["a", "b", "c", "d d", "é"]
DIRS = ["", "x", "x/y", "z"]


@pytest.fixture
def store(tmp_path):
    s = PackStore(tmp_path / "store", connect(_mk(tmp_path / "store") / "meta.db"))
    yield s
    s.close()


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _apply(top: Path, outside: Path, op: tuple[str, str, str, int]) -> None:
    """One change a running app might make; ops that do not apply are skipped."""
    kind, d, name, n = op
    folder = top / d if d else top
    p = folder / name
    if not folder.is_dir():
        if kind == "mkdir":
            os.makedirs(folder, exist_ok=True)
        return
    try:
        if kind == "write":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            p.write_bytes(os.urandom(n % 3) * (n * 997 % 90_000))
        elif kind == "patch" and p.is_file() and not p.is_symlink():
            with open(p, "r+b") as f:
                f.seek(n % max(1, p.stat().st_size))
                f.write(b"patched")
        elif kind == "rm":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        elif kind == "mkdir" and not p.exists():
            p.mkdir()
            (p / "inner").write_bytes(b"made with its folder")
        elif kind == "chmod" and p.exists() and not p.is_symlink():
            p.chmod(0o700 if n % 2 else 0o644 | 0o111 * (p.is_dir()))
        elif kind == "link" and not p.exists() and not p.is_symlink():
            p.symlink_to(f"../{n}")
        elif kind == "move":
            dest = top / DIRS[n % len(DIRS)] / NAMES[n % len(NAMES)]
            if p.exists() and dest.parent.is_dir() and not dest.exists() and not str(
                    dest).startswith(str(p) + "/"):
                os.rename(p, dest)
        elif kind == "hardlink" and p.is_file() and not p.is_symlink():
            other = top / DIRS[n % len(DIRS)] / f"h{n}"
            if other.parent.is_dir() and not other.exists():
                os.link(p, other)
                with open(other, "r+b") as f:  # the old name sees no event for this
                    f.write(b"through another name")
        elif kind == "outside" and p.is_file() and not p.is_symlink():
            other = outside / f"h{n}"
            if not other.exists():  # only before watching: see ChangeWatcher's blind spots
                os.link(p, other)
        elif kind == "outside-write":
            for other in outside.iterdir():
                with open(other, "r+b") as f:
                    f.write(os.urandom(8))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError):
        pass


KINDS = ["write", "patch", "rm", "mkdir", "chmod", "link", "move", "hardlink", "outside-write"]


def ops(*extra: str) -> st.SearchStrategy[list[tuple[str, str, str, int]]]:
    return st.lists(st.tuples(st.sampled_from(KINDS + list(extra)), st.sampled_from(DIRS),
                              st.sampled_from(NAMES), st.integers(0, 50)), max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@pytest.mark.slow
@given(first=ops("outside"), rounds=st.lists(ops(), min_size=1, max_size=3))
def test_update_from_events_equals_a_full_snapshot(tmp_path, store, first, rounds):
    top = tmp_path / "t"
    outside = tmp_path / "outside"
    for p in (top, outside):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir()
    for op in first:
        _apply(top, outside, op)
    writer = store.writer()
    with ChangeWatcher() as watcher:
        prev = snapshot(top, store, writer, {}, watch=watcher.watcher("s", str(top)))
        writer.flush()
        for batch in rounds:
            for op in batch:
                _apply(top, outside, op)
            changes = watcher.take()
            assert changes is not None
            ch = changes.get("s")
            names = ch.names if ch else {}
            for rel in prev.linked:  # what the live commit adds: inotify's blind spot
                parent, _, name = rel.rpartition("/")
                names.setdefault(parent, set()).add(name)
            prev = update(top, store, writer, prev, names, ch.fresh if ch else set(),
                          watch=watcher.watcher("s", str(top)))
            writer.flush()
            full = snapshot(top, store, None, {})
            assert prev.root == full.root
            assert prev.total_size == full.total_size
            # Files alike; folders' entries only where the pass listed them whole (the rest
            # of a folder's rows is only as new as the change set: see snapshot._complete).
            assert {k for k in prev.cache if not k.endswith(b"/")} == {
                k for k in full.cache if not k.endswith(b"/")}
            assert {k for k in prev.cache if k.endswith(b"/")} <= set(full.cache)


def test_overflow_means_look_at_everything(tmp_path):
    top = _mk(tmp_path / "t")
    with ChangeWatcher() as watcher:
        watcher.watch("s", str(top), "")
        watcher._lost = True  # what a full kernel queue sets
        assert watcher.take() is None


def test_closing_a_watcher_wakes_its_reader_at_once(tmp_path, monkeypatch):
    """A commit on plain folders ends by closing its watcher: the reader is woken, not left
    to notice its stop flag at its next timeout (with a timeout of an hour, close would
    hang)."""
    import threading

    from dotmesh.capture import changes

    monkeypatch.setattr(changes, "WAKE_BACKSTOP", 3600.0)
    top = _mk(tmp_path / "t")
    watcher = ChangeWatcher()
    watcher.watch("s", str(top), "")
    (top / "new").write_text("x")
    closed = threading.Thread(target=watcher.close, daemon=True)
    closed.start()
    closed.join(30)
    assert not closed.is_alive()


def test_a_watcher_without_a_thread_looks_at_everything_and_keeps_no_descriptor(
        tmp_path, monkeypatch):
    import os
    import threading

    def refuse(self):
        raise RuntimeError("can't start new thread")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(threading.Thread, "start", refuse)
    watcher = ChangeWatcher()
    monkeypatch.undo()
    assert watcher.take() is None
    watcher.close()
    assert len(os.listdir("/proc/self/fd")) == before
