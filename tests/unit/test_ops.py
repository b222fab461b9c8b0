"""The verbs of ops/, in process on a temporary repository: what a library caller gets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dotmesh.errors import AlreadyExists, Conflict, Locked, NotFound, UsageError
from dotmesh.ops import checkout as checkout_ops
from dotmesh.ops import commit as commit_ops
from dotmesh.ops import dots, history, hooks
from dotmesh.store.repo import Repo


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    r = Repo(tmp_path / "home")
    dots.init(r, "app")
    yield r
    r.close()


def _write(repo: Repo, name: str, text: str) -> None:
    (dots.path(repo, "app.db") / name).write_text(text)


def _read(repo: Repo, name: str) -> str:
    return (repo.stable("app", "db") / name).read_text()


def _commit(repo: Repo, message: str, **meta: str) -> bytes:
    return commit_ops.commit(repo, "app", message, meta, freeze=False).id


def test_init_makes_the_first_dot_current(repo: Repo) -> None:
    assert repo.current_dot() == "app"
    assert dots.init(repo, "other") is False  # a second one does not take over
    with pytest.raises(AlreadyExists):
        dots.init(repo, "app")


def test_commit_log_and_diff(repo: Repo) -> None:
    _write(repo, "a", "one")
    first = _commit(repo, "first", ticket="BUG-42")
    _write(repo, "a", "two")
    _write(repo, "b", "new")
    second = _commit(repo, "second")
    log = list(history.log(repo, "app"))
    assert [oid for oid, _ in log] == [second, first]
    assert log[1][1].metadata["ticket"] == "BUG-42"
    changes = {(c.subdot, c.path): c.status for c in history.diff(repo, "app", "HEAD^", "HEAD")}
    assert changes == {("db", "a"): "changed", ("db", "b"): "added"}
    assert history.diff(repo, "app") == []  # nothing changed since


def test_reserved_metadata_and_empty_messages_are_refused_by_the_verb(repo: Repo) -> None:
    with pytest.raises(UsageError, match="reserved"):
        _commit(repo, "x", **{"dm.freeze_ms": "1"})
    with pytest.raises(UsageError, match="empty"):
        _commit(repo, "  ")
    assert list(history.log(repo, "app")) == []


def test_reset_is_hard_with_or_without_the_flag_and_keeps_the_discarded_state(
        repo: Repo) -> None:
    _write(repo, "a", "one")
    first = _commit(repo, "first")
    _write(repo, "a", "two")
    _commit(repo, "second")
    _write(repo, "a", "uncommitted")
    r = checkout_ops.reset(repo, "app", "HEAD^", hard=False)
    assert r.new == first and _read(repo, "a") == "one"
    assert r.saved is not None
    entry = history.reflog(repo, "app")[0]
    assert entry.saved == r.saved and entry.action == "reset"
    checkout_ops.reset(repo, "app", r.saved.hex(), hard=True)
    assert _read(repo, "a") == "uncommitted"


def test_branches_keep_their_own_folders(repo: Repo) -> None:
    _write(repo, "a", "main")
    _commit(repo, "on master")
    moved, _ = checkout_ops.checkout(repo, "app", "fix", create=True)
    assert moved and repo.branch("app") == "fix"
    _write(repo, "a", "fix, not committed")
    checkout_ops.checkout(repo, "app", "master")
    assert _read(repo, "a") == "main"
    checkout_ops.checkout(repo, "app", "fix")
    assert _read(repo, "a") == "fix, not committed"
    with pytest.raises(AlreadyExists):
        checkout_ops.checkout(repo, "app", "master", create=True)
    with pytest.raises(NotFound):
        checkout_ops.checkout(repo, "app", "nope")


def test_a_failed_hook_leaves_no_commit(repo: Repo) -> None:
    _write(repo, "a", "one")
    hooks.add_hook(repo, "app", "pre-freeze", "exit 3", None, 5.0)
    with pytest.raises(Exception, match="hook"):
        _commit(repo, "blocked")
    assert list(history.log(repo, "app")) == []
    [hook] = hooks.hooks(repo, "app")
    hooks.remove_hook(repo, "app", hook.id)
    with pytest.raises(NotFound):
        hooks.remove_hook(repo, "app", hook.id)
    _commit(repo, "free")


def test_a_stale_head_is_a_conflict(repo: Repo) -> None:
    _write(repo, "a", "one")
    first = _commit(repo, "first")
    _write(repo, "a", "two")
    _commit(repo, "second")
    with pytest.raises(Conflict):
        checkout_ops.reset_hard(repo, "app", "HEAD^", expect_old=first)


def test_a_reset_keeps_the_fingerprints_of_the_versions_it_brings_back(repo: Repo) -> None:
    """A reset first stores the state it discards, which supersedes the head's version of
    each changed file; the reset then brings that version back. Without its superblock
    fingerprints, the next commit would hash every block of each such file again (204,000
    of a 2 GiB dot's, where 17,000 changed). So too for a reset to an older commit."""
    from dotmesh.meta.db import load_fingerprints
    from dotmesh.model.objects import Tree

    heap = dots.path(repo, "app.db") / "heap"

    def content_at(ref: str) -> bytes:
        root = repo.commit(checkout_ops._target(repo, "app", ref)).subdots["db"]
        [entry] = [e for e in Tree.decode(repo.packs.get(root.tree)).entries
                   if e.name == "heap"]
        assert entry.chunked and isinstance(entry.ref, bytes)
        return entry.ref

    def write_page(n: int, fill: bytes) -> None:
        with open(heap, "r+b") as f:
            f.seek(n * 8192)
            f.write(fill * 8192)

    heap.write_bytes(bytes(range(256)) * 32 * 64)  # 64 pages of 8 KiB: a paged file
    _commit(repo, "first")
    write_page(3, b"a")
    _commit(repo, "second")
    for ref, page in (("HEAD", 9), ("HEAD^", 17)):
        write_page(page, b"b")  # a working change the reset discards (and stores)
        checkout_ops.reset_hard(repo, "app", ref)
        assert load_fingerprints(repo.conn, content_at("HEAD")) is not None, ref


def test_delete_needs_force(repo: Repo) -> None:
    with pytest.raises(UsageError):
        dots.delete(repo, "app", force=False)
    dots.delete(repo, "app", force=True)
    assert repo.dots() == [] and repo.current_dot() is None


def test_the_store_lock_excludes_dot_work_and_dots_do_not_exclude_each_other(
        repo: Repo) -> None:
    dots.init(repo, "other")
    with repo.lock("app", "commit"), repo.lock("other", "commit"):
        with pytest.raises(Locked, match="store is busy"), repo.store_lock("gc"):
            pass
    with repo.store_lock("gc"):
        with pytest.raises(Locked, match=r"dm gc, pid \d+"), repo.lock("app", "commit"):
            pass
    with repo.lock("app", "commit"):
        with pytest.raises(Locked, match="dot 'app' is busy"), repo.lock("app", "reset"):
            pass


def test_set_upstream_names_the_remote_dot_and_a_bare_name_is_the_users_own(
        repo: Repo) -> None:
    from dotmesh.ops import remotes

    remotes._save(repo, remotes.Remote("hub", remotes.HUB, "http://127.0.0.1:9", "alice", "k"))
    hub = remotes.get(repo, "hub")
    assert remotes.remote_dot_for(repo, hub, "app", None) == "alice/app"
    assert remotes.set_upstream(repo, "app", "hub", "bob/shared") == "bob/shared"
    assert remotes.remote_dot_for(repo, hub, "app", None) == "bob/shared"
    assert remotes.set_upstream(repo, "app", "hub", "mine") == "alice/mine"  # as clone does
    assert dots.statuses(repo, ["app"])[0].remotes == {"hub": "alice/mine"}
    for remote, rdot, error in [("nohub", "bob/x", NotFound), ("hub", "bob/x/y", UsageError),
                                ("hub", "bob/../x", UsageError), ("hub", "", UsageError)]:
        with pytest.raises(error):
            remotes.set_upstream(repo, "app", remote, rdot)
    with pytest.raises(NotFound):
        remotes.set_upstream(repo, "ghost", "hub", "bob/x")
    assert dots.statuses(repo, ["app"])[0].remotes == {"hub": "alice/mine"}  # untouched


@pytest.mark.slow
def test_a_hook_past_its_timeout_is_killed_with_what_it_started(repo: Repo, tmp_path) -> None:
    """The hook and every process it started end at its timeout; the commit does not
    happen, and what the hook printed before was shown."""
    from dotmesh.capture.hooks import Hook, HookFailed, run_hooks

    pidfile = tmp_path / "child.pid"
    shown: list[str] = []
    hook = Hook(1, "app", None, "pre-freeze", f"sleep 60 & echo $! > {pidfile}; echo started; "
                "wait", 1.0)
    with pytest.raises(HookFailed, match="ran past its 1 s timeout"):
        run_hooks([hook], "pre-freeze", {}, shown.append)
    assert shown == ["hook #1 (pre-freeze): started"]
    child = int(pidfile.read_text())
    for _ in range(100):  # killed; reaped by init a moment later
        if not Path(f"/proc/{child}").exists() or "Z" in Path(
                f"/proc/{child}/stat").read_text().split(")")[-1][:3]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the hook's child {child} still runs")


def test_a_mount_whose_server_is_a_zombie_is_not_serving() -> None:
    """dm mount lists a mount as serving only while its FUSE server can still answer: an
    ended server that its parent has not reaped yet (a zombie) answers nothing."""
    import subprocess

    from dotmesh.model.ids import HOLE
    from dotmesh.ops.mount import Mounted

    def mounted(pid: int) -> Mounted:
        return Mounted("/mnt/x", "app", HOLE, pid, 0)

    ended = subprocess.Popen(["true"])
    running = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{ended.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not mounted(ended.pid).serving
        assert mounted(running.pid).serving
        assert not mounted(0).serving
    finally:
        running.kill()
        for p in (ended, running):
            p.wait()
    assert not mounted(running.pid).serving  # gone


def test_reflog_names_every_discarded_state_an_entry_was_given(repo: Repo) -> None:
    """fsck ties every state an interrupted reset left unnamed to the one entry it writes:
    the reflog lists them all, not the last one read."""
    from dotmesh.meta import refs
    from dotmesh.meta.db import Tx

    _write(repo, "a", "one")
    head = _commit(repo, "first")
    names = ["discarded-00000000000000aa", "discarded-00000000000000bb"]
    with Tx(repo.conn) as tx:
        refs.begin_restore(tx, "app", "reset", "master", head, head, None, "reset", "m")
        for i, name in enumerate(names):
            refs.add_discarded(tx, "app", name, "master", head, head, i, "me", "discarded")
    with Tx(repo.conn) as tx:
        refs.drop_restore(tx, "app", frozenset({head}))
    entry = history.reflog(repo, "app")[0]
    assert entry.action == "reset (interrupted)"
    assert entry.kept == tuple(names) and entry.kept_as == names[-1]


def test_a_reset_over_paged_files_writes_their_changed_pages_found_by_comparing_lists(
        repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two paged files' lists are compared as bytes (restore.differing_blocks), not decoded:
    the pages the plan finds are the changed ones, and the file, grown or shrunk, comes back
    byte for byte."""
    from dotmesh.workdir import restore

    heap = dots.path(repo, "app.db") / "heap"
    first = bytes(range(256)) * 32 * 64  # 64 pages of 8 KiB: a paged file
    heap.write_bytes(first)
    _commit(repo, "first")
    second = bytearray(first)
    for page in (0, 15, 16, 63):
        second[page * 8192:(page + 1) * 8192] = bytes([page]) * 8192
    second += b"\x05" * 8192 * 2  # grown by two pages
    heap.write_bytes(second)
    second_id = _commit(repo, "second")
    found: list[list[int]] = []
    compare = restore.differing_blocks

    def spy(old: bytes, new: bytes) -> list[tuple[bytes, int, int]] | None:
        got = compare(old, new)
        found.append([off // 8192 for off, _, _ in got or []])
        return got

    monkeypatch.setattr(restore, "differing_blocks", spy)
    checkout_ops.reset_hard(repo, "app", "HEAD^")
    assert heap.read_bytes() == first and found == [[0, 15, 16, 63]]
    checkout_ops.reset_hard(repo, "app", second_id.hex())
    assert heap.read_bytes() == bytes(second) and found[1] == [0, 15, 16, 63, 64, 65]


def test_a_paged_list_that_disagrees_with_its_entry_stops_the_plan(repo: Repo,
                                                                   tmp_path: Path) -> None:
    from dotmesh.errors import Corrupt
    from dotmesh.model.ids import object_id
    from dotmesh.model.objects import FILE, KIND_FILELIST, Entry, FileList
    from dotmesh.workdir.restore import Policy, _Planner

    writer = repo.packs.writer()
    lists = [writer.put(KIND_FILELIST, FileList(
        tuple((object_id(bytes([i, k])), 8192) for k in range(3))).encode()) for i in (1, 2)]
    writer.flush()
    plan = _Planner(tmp_path, None, repo.packs, Policy())
    c, t = (Entry("heap", FILE, 0o644, 0, 0, 1, 3 * 8192, ref, True) for ref in lists)
    assert len(plan._wanted(c, t, b"heap")) == 3
    for lying in (c, t):
        bad = Entry("heap", FILE, 0o644, 0, 0, 1, 4 * 8192, lying.ref, True)
        with pytest.raises(Corrupt, match="says 32768 bytes but its content has 24576"):
            plan._wanted(bad if lying is c else c, bad if lying is t else t, b"heap")
