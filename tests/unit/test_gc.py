"""gc, reflog expiry and branch deletion: the pure plan, then the verbs on a real store."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dotmesh.errors import Conflict, Corrupt, Locked, NotFound
from dotmesh.meta import index
from dotmesh.meta.db import Tx
from dotmesh.model.ids import HOLE, ObjectId, object_id
from dotmesh.model.objects import DIR, FILE, KIND_CHUNK, Commit, FileList, Tree
from dotmesh.ops import checkout as checkout_ops
from dotmesh.ops import commit as commit_ops
from dotmesh.ops import dots, fsck
from dotmesh.ops import gc as gc_ops
from dotmesh.store.packs import PACK_MAGIC, RECORD
from dotmesh.store.repo import Repo

# ------------------------------------------------------------------ the plan, pure

H = RECORD.size
M = len(PACK_MAGIC)


def _ids(*names: str) -> list[bytes]:
    return [n.encode().ljust(32, b"\0") for n in names]


def _plan(rows: list[tuple[bytes, int, int, int]], live: set[bytes], packs: dict[int, str],
          files: dict[str, int], busy: set[str] = frozenset(),  # type: ignore[assignment]
          below: float = 0.8) -> dict[str, gc_ops.PackPlan]:
    return {p.name: p for p in gc_ops.plan_packs(rows, live, packs, files, busy.__contains__,
                                                 below)}


def test_plan_deletes_repacks_cuts_and_forgets() -> None:
    a, b, c, d, e = _ids("a", "b", "c", "d", "e")
    rows = [(a, 1, M + H, 100),  # pack 1: all dead -> delete
            (b, 2, M + H, 100), (c, 2, M + 2 * H + 100, 900),  # pack 2: 10% live -> repack
            (d, 3, M + H, 1000),  # pack 3: live, then a tail a killed writer left -> cut
            (e, 4, M + H, 1000)]  # pack 4: whole and live -> keep
    files = {"p1": M + H + 100, "p2": M + 2 * H + 1000, "p3": M + H + 1000 + 100,
             "p4": M + H + 1000, "orphan": 5000}
    plans = _plan(rows, {b, d, e}, {1: "p1", 2: "p2", 3: "p3", 4: "p4"}, files)
    assert plans["p1"].action == gc_ops.DELETE and plans["p1"].after == 0
    assert plans["p2"].action == gc_ops.REPACK and plans["p2"].live == [b]
    assert plans["p2"].after == H + 100
    assert plans["p3"].action == gc_ops.CUT and plans["p3"].cut == M + H + 1000
    assert plans["p4"].action == gc_ops.KEEP
    assert plans["orphan"].action == gc_ops.DELETE and plans["orphan"].pack is None


def test_plan_forgets_dead_rows_of_a_pack_live_enough_and_leaves_busy_packs() -> None:
    a, b = _ids("a", "b")
    rows = [(a, 1, M + H, 1000), (b, 1, M + 2 * H + 1000, 10)]
    files = {"p1": M + 2 * H + 1010, "p2": 100, "writing": 10}
    plans = _plan(rows, {a}, {1: "p1", 2: "p2"}, files, busy={"p2", "writing"})
    assert plans["p1"].action == gc_ops.CUT  # the dead record was last: cut it off
    rows = [(b, 1, M + H, 10), (a, 1, M + 2 * H + 10, 1000)]
    plans = _plan(rows, {a}, {1: "p1", 2: "p2"}, files, busy={"p2", "writing"})
    assert plans["p1"].action == gc_ops.FORGET and plans["p1"].dead == [b]
    assert plans["p2"].action == gc_ops.BUSY and plans["writing"].action == gc_ops.BUSY


def test_plan_of_a_pack_row_whose_file_is_gone() -> None:
    a, b = _ids("a", "b")
    plans = _plan([(a, 1, M + H, 10), (b, 2, M + H, 10)], {b}, {1: "p1", 2: "p2"}, {})
    assert plans["p1"].action == gc_ops.DELETE  # nothing live: the row goes
    assert plans["p2"].action == gc_ops.FORGET  # live rows stay for fsck to report


# ------------------------------------------------------------------ on a store


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    r = Repo(tmp_path / "home")
    dots.init(r, "app")
    yield r
    r.close()


def _folder(repo: Repo, dot: str = "app") -> Path:
    return dots.path(repo, f"{dot}.db")


def _commit(repo: Repo, message: str, dot: str = "app") -> ObjectId:
    return ObjectId(commit_ops.commit(repo, dot, message, {}, freeze=False).id)


def files_of(repo: Repo, commit: ObjectId) -> dict[str, bytes]:
    """What a commit records, read from the store (every object verified)."""
    out: dict[str, bytes] = {}

    def walk(tree: bytes, prefix: str) -> None:
        for e in Tree.decode(repo.packs.get(ObjectId(tree))).entries:
            if e.kind == DIR:
                assert isinstance(e.ref, bytes)
                walk(e.ref, f"{prefix}{e.name}/")
            elif e.kind == FILE:
                if e.ref is None:
                    out[prefix + e.name] = b""
                elif e.chunked:
                    assert isinstance(e.ref, bytes)
                    fl = FileList.decode(repo.packs.get(ObjectId(e.ref)))
                    out[prefix + e.name] = b"".join(
                        bytes(n) if c == HOLE else repo.packs.get(c) for c, n in fl.chunks)
                else:
                    assert isinstance(e.ref, bytes)
                    out[prefix + e.name] = repo.packs.get(ObjectId(e.ref))

    for sub, root in sorted(Commit.decode(repo.packs.get(commit)).subdots.items()):
        walk(root.tree, f"{sub}:")
    return out


def _clean(repo: Repo) -> None:
    r = fsck.fsck(repo)
    assert r.ok, r.problems


def test_gc_with_nothing_to_do_changes_nothing(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(os.urandom(100_000))
    c = _commit(repo, "one")
    before = gc_ops.stored_bytes(repo)
    r = gc_ops.gc(repo)
    assert r.applied and r.stored_after == before and r.plan.dead == 0
    assert files_of(repo, c)["db:a"] == (_folder(repo) / "a").read_bytes()
    _clean(repo)


def test_dot_delete_then_gc_frees_the_dots_unique_objects(repo: Repo) -> None:
    shared = os.urandom(70_000)
    (_folder(repo) / "a").write_bytes(shared)
    keep = _commit(repo, "app")
    base = gc_ops.stored_bytes(repo)
    dots.init(repo, "big")
    (_folder(repo, "big") / "same").write_bytes(shared)  # shared with app: stays
    (_folder(repo, "big") / "own").write_bytes(os.urandom(3 << 20))
    _commit(repo, "big", "big")
    assert gc_ops.stored_bytes(repo) > base + (3 << 20)
    dots.delete(repo, "big", force=True)
    dry = gc_ops.gc(repo, dry_run=True)
    assert not dry.applied and dry.plan.before - dry.stored_after > 3 << 20
    r = gc_ops.gc(repo)
    assert r.stored_after == gc_ops.stored_bytes(repo) <= base + 2048
    assert files_of(repo, keep)["db:a"] == shared
    _clean(repo)
    assert gc_ops.gc(repo).plan.dead == 0  # a rerun finds nothing more


def test_reflog_keeps_discarded_states_until_expired(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(b"one")
    _commit(repo, "one")
    (_folder(repo) / "big").write_bytes(os.urandom(1 << 20))
    r = checkout_ops.reset(repo, "app", "HEAD", hard=True)  # the big file is saved, then gone
    assert r.saved is not None
    gc_ops.gc(repo)
    assert files_of(repo, r.saved)["db:big"]  # still there: the reflog names it
    assert gc_ops.expire_reflog(repo, dry_run=True) == 0  # younger than 30 days
    assert gc_ops.expire_reflog(repo, days=0, dry_run=True) >= 2
    assert gc_ops.expire_reflog(repo, days=0) >= 2
    before = gc_ops.stored_bytes(repo)
    gc_ops.gc(repo)
    assert gc_ops.stored_bytes(repo) < before - (1 << 20)
    with pytest.raises(NotFound):
        repo.packs.get(r.saved)
    _clean(repo)


def test_repack_moves_live_objects_out_of_mostly_dead_packs(repo: Repo) -> None:
    keep = os.urandom(20_000)
    (_folder(repo) / "keep").write_bytes(keep)
    (_folder(repo) / "drop").write_bytes(os.urandom(500_000))
    first = _commit(repo, "both")  # one pack: both files
    (_folder(repo) / "drop").unlink()
    second = _commit(repo, "keep only")
    with Tx(repo.conn) as c:
        c.execute("DELETE FROM reflog")
    repo.conn.execute("UPDATE branches SET head=?", (second,))
    # the first commit is the second's parent: make the second a root commit instead
    cm = Commit.decode(repo.packs.get(second))
    orphan = Commit(parents=(), subdots=cm.subdots, message="alone", author="t",
                    timestamp_ns=cm.timestamp_ns, metadata={})
    w = repo.packs.writer()
    alone = w.put(3, orphan.encode())
    w.flush()
    repo.conn.execute("UPDATE branches SET head=?", (alone,))
    with Tx(repo.conn) as c:
        c.execute("DELETE FROM statcache")
    r = gc_ops.gc(repo)
    assert r.plan.count(gc_ops.REPACK) >= 1
    assert not repo.packs.has(first)
    assert files_of(repo, alone) == {"db:keep": keep}
    assert gc_ops.stored_bytes(repo) < 100_000
    _clean(repo)


def test_killed_writers_packs_are_removed_but_not_a_live_writers(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(b"x" * 5000)
    c = _commit(repo, "one")
    live = repo.packs.writer()  # a writer of this process, still at work: holds its pack
    live.add(KIND_CHUNK, object_id(b"0123456789"), 10, b"0123456789", False)
    (repo.packs.dir / ("ab" * 16 + ".pack")).write_bytes(PACK_MAGIC + b"junk")  # a kill's
    r = gc_ops.gc(repo)
    assert r.plan.count(gc_ops.BUSY) == 1 and r.plan.orphans == 1
    assert not (repo.packs.dir / ("ab" * 16 + ".pack")).exists()
    live.flush()  # the writer finishes: its object is there
    assert gc_ops.gc(repo, dry_run=True).plan.count(gc_ops.BUSY) == 0
    assert files_of(repo, c)["db:a"] == b"x" * 5000
    _clean(repo)


def test_stat_cache_contents_stay(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(os.urandom(90_000))
    _commit(repo, "one")
    (_folder(repo) / "a").write_bytes(os.urandom(90_000))
    _commit(repo, "two")
    gc_ops.expire_reflog(repo, days=0)
    repo.conn.execute("UPDATE branches SET head=NULL")  # only the stat cache names "two"
    live = gc_ops.mark(repo)
    cached = [c for c, _ in gc_ops.cached_contents(repo)]
    assert cached and all(c in live for c in cached)


def test_gc_refuses_a_store_missing_a_reachable_object(repo: Repo) -> None:
    (_folder(repo) / "sub").mkdir()
    (_folder(repo) / "sub" / "a").write_bytes(b"a" * 100)
    c = _commit(repo, "one")
    tree = Commit.decode(repo.packs.get(c)).subdots["db"].tree
    with Tx(repo.conn) as tx:
        index.drop_object_rows(tx, [tree])
    before = gc_ops.stored_bytes(repo)
    with pytest.raises(Corrupt, match="gc needs every reachable object"):
        gc_ops.gc(repo)
    assert gc_ops.stored_bytes(repo) == before


def test_gc_and_dot_commands_exclude_each_other(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(b"a")
    with repo.lock("app", "commit"), pytest.raises(Locked, match="other dm commands"):
        gc_ops.gc(repo)
    with repo.store_lock("gc", exclusive=True), pytest.raises(Locked, match="dm gc"):
        _commit(repo, "during gc")
    _commit(repo, "after")


def test_branch_delete(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(b"one")
    _commit(repo, "one")
    checkout_ops.checkout(repo, "app", "merged", create=True)
    checkout_ops.checkout(repo, "app", "work", create=True)
    (_folder(repo) / "a").write_bytes(b"work")
    work = _commit(repo, "work")
    with pytest.raises(Conflict, match="checked out"):
        gc_ops.delete_branch(repo, "app", "work")
    checkout_ops.checkout(repo, "app", "master")
    with pytest.raises(NotFound):
        gc_ops.delete_branch(repo, "app", "nope")
    with pytest.raises(Conflict, match="no other branch"):
        gc_ops.delete_branch(repo, "app", "work")
    assert gc_ops.delete_branch(repo, "app", "merged") is not None  # master has its head
    assert gc_ops.delete_branch(repo, "app", "work", force=True) == work
    assert set(repo.branches("app")) == {"master"}
    assert not (repo.dot_dir("app") / "branches" / "work").exists()
    gc_ops.gc(repo)
    assert repo.packs.has(work)  # the reflog names it until it expires
    gc_ops.expire_reflog(repo, days=0)
    gc_ops.gc(repo)
    assert not repo.packs.has(work)
    _clean(repo)


def test_branch_delete_refuses_uncommitted_parked_changes(repo: Repo) -> None:
    (_folder(repo) / "a").write_bytes(b"one")
    _commit(repo, "one")
    checkout_ops.checkout(repo, "app", "side", create=True)
    (_folder(repo) / "a").write_bytes(b"not committed")
    checkout_ops.checkout(repo, "app", "master")
    with pytest.raises(Conflict, match="not committed"):
        gc_ops.delete_branch(repo, "app", "side")
    gc_ops.delete_branch(repo, "app", "side", force=True)


def _gc_killed_at(root: Path, point: str) -> None:
    """gc in a child process that dies (SIGKILL) at ``point``, as kill -9 would."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ[gc_ops.KILL_ENV] = point
            gc_ops.gc(Repo(root))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point


@pytest.mark.parametrize("point", ["rows-dropped", "delete-row", "repack-written",
                                   "repack-indexed"])
def test_kill_at_each_step_loses_nothing_and_a_rerun_finishes(repo: Repo, point: str) -> None:
    states = {}
    (_folder(repo) / "keep").write_bytes(os.urandom(20_000))
    (_folder(repo) / "drop").write_bytes(os.urandom(300_000))
    _commit(repo, "both")  # its pack will be mostly dead: repacked
    (_folder(repo) / "drop").unlink()
    kept_commit = _commit(repo, "keep")
    states[kept_commit] = files_of(repo, kept_commit)
    dots.init(repo, "gone")
    (_folder(repo, "gone") / "x").write_bytes(os.urandom(200_000))
    _commit(repo, "gone", "gone")
    dots.delete(repo, "gone", force=True)  # its pack: deleted
    # only the last commit stays: history cut at it
    cm = Commit.decode(repo.packs.get(next(iter(states))))
    w = repo.packs.writer()
    alone = ObjectId(w.put(3, Commit(parents=(), subdots=cm.subdots, message="alone",
                                     author="t", timestamp_ns=1, metadata={}).encode()))
    w.flush()
    repo.conn.execute("UPDATE branches SET head=?", (alone,))
    gc_ops.expire_reflog(repo, days=0)
    states = {alone: next(iter(states.values()))}
    _gc_killed_at(repo.root, point)
    repo.close()
    again = Repo(repo.root)
    _clean(again)
    assert files_of(again, alone) == states[alone]
    gc_ops.gc(again)
    _clean(again)
    assert files_of(again, alone) == states[alone]
    left = gc_ops.gc(again, dry_run=True).plan
    assert left.dead == 0 and left.before == left.after
    assert gc_ops.stored_bytes(again) < 60_000
    again.close()


def test_the_defaults_help_shows_are_the_ones_gc_uses() -> None:
    """--help loads no store code, so the CLI repeats two numbers: they must agree."""
    from dotmesh.cli import space

    assert space.REPACK_BELOW == gc_ops.REPACK_BELOW
    assert space.REFLOG_EXPIRE_DAYS == (gc_ops.REFLOG_EXPIRE_DAYS,
                                        gc_ops.DEFAULTS[gc_ops.REFLOG_EXPIRE_DAYS])
