"""The compiled folder listing (dotmesh.fs.scan) against os.lstat, on a real folder."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from dotmesh.fs import scan


def _expected(folder: Path) -> set[scan.Entry]:
    return {scan.entry(de.name, de.stat(follow_symlinks=False)) for de in os.scandir(folder)}


def test_listing_matches_lstat_for_every_kind_of_entry(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 5000)
    (tmp_path / "empty").touch()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dangling").symlink_to("nowhere")
    os.link(tmp_path / "file", tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \xff"  # not UTF-8: surrogateescape, as os does
    with open(odd, "wb") as f:
        f.write(b"latin-1 name")
    os.utime(tmp_path / "file", ns=(1, -1_500_000_001))  # before 1970, odd nanoseconds
    own, got = scan.listing(str(tmp_path), nofollow=False)
    assert set(got) == _expected(tmp_path)
    assert own == scan.entry("", os.stat(tmp_path))  # the folder's own, named ""
    assert len(got) == 8
    by_name = {e[0]: scan.Lstat._make(e) for e in got}
    assert by_name["file"].st_mtime_ns == -1_500_000_001
    assert by_name["hard"].st_nlink == 2 and stat.S_ISLNK(by_name["link"].st_mode)
    assert os.fsencode("caf\udce9 \udcff") in {os.fsencode(n) for n in by_name}


def test_a_large_folder_is_listed_whole(tmp_path: Path) -> None:
    for i in range(3000):  # past the first growth of the entry and name buffers
        (tmp_path / (f"{i:05d}-" + "n" * (i % 200))).touch()
    assert set(scan.listing(str(tmp_path))[1]) == _expected(tmp_path)


def test_gone_or_not_a_folder_lists_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    assert scan.listing(str(tmp_path / "missing")) == (None, [])
    assert scan.listing(str(tmp_path / "file")) == (None, [])


def test_a_symlinked_folder_is_not_followed_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "inside").touch()
    (tmp_path / "alias").symlink_to("real")
    assert scan.listing(str(tmp_path / "alias")) == (None, [])  # a walk stays in its subdot
    own, inside = scan.listing(str(tmp_path / "alias"), nofollow=False)
    assert [e[0] for e in inside] == ["inside"] and own is not None
    assert own[2] == os.stat(tmp_path / "real").st_ino  # the folder the link leads to
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as err:  # not an empty folder: a loop is an error
        scan.listing(str(tmp_path / "loop"), nofollow=False)
    assert err.value.errno == errno.ELOOP
    assert scan.listing(str(tmp_path / "loop")) == (None, [])


def test_other_errors_raise_with_the_path(tmp_path: Path) -> None:
    too_long = str(tmp_path / ("n" * 300))  # longer than a name may be: ENAMETOOLONG
    with pytest.raises(OSError) as err:
        scan.listing(too_long)
    assert err.value.filename == too_long and not isinstance(err.value, FileNotFoundError)


def test_a_forked_child_walks_with_threads_of_its_own(tmp_path: Path) -> None:
    """The daemon forks a child per command: the walk's listing thread (made in the parent)
    does not exist there, and must not be waited for."""
    from dotmesh.workdir import snapshot

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    snapshot._Walk(str(tmp_path), {}, None).tree("")  # the parent's thread exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit code
        try:
            walk = snapshot._Walk(str(tmp_path), {}, None)
            walk.tree("")
            os._exit(0 if sorted(walk.folders) == ["", "a"] else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the child's walk hung on its parent's thread")


def _walked(top: Path, cache: dict, compiled: bool, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[dict, dict, int, dict, list]:
    from dotmesh.workdir import snapshot

    with monkeypatch.context() as m:
        if not compiled:  # the C part vouches for nothing: the Python loop does it all
            m.setattr(scan, "match", lambda prefix, entries, *rest: (entries, 0, 0))
        walk = snapshot._Walk(str(top), dict(cache), None)
        walk.tree("")
    rows = {rel: sorted(map(tuple, r)) for rel, r in walk.folders.items()}
    return rows, walk.hits, walk.total, walk.newest, sorted(walk.linked)


def test_the_compiled_match_is_the_python_loop(tmp_path: Path, monkeypatch) -> None:
    """Every kind of entry and of cache entry: the rows, hits, sizes, newest ctimes and
    links of a walk are the same whether the C part vouches for the matching files or not."""
    from dotmesh.meta.statcache import CHUNKED, HAS_CONTENT, HINT_ONLY, NO_CONTENT

    top = tmp_path / "top"
    (top / "sub" / "deep").mkdir(parents=True)
    for i in range(40):
        (top / "sub" / f"f{i}").write_bytes(os.urandom(i * 100 + 1))
    (top / "sub" / "deep" / "caf\udce9").write_bytes(b"odd name")
    (top / "empty").touch()
    (top / "big").write_bytes(b"b" * 10000)
    os.link(top / "big", top / "hard")
    (top / "link").symlink_to("big")
    cache = {}
    for rel in ["sub/" + n for n in os.listdir(top / "sub")] + ["sub/deep/caf\udce9", "big",
                                                                  "hard", "empty"]:
        st = os.lstat(top / rel)
        if not stat.S_ISREG(st.st_mode):
            continue
        n = int(rel[5:]) if rel[5:].isdigit() else 0
        flags = [HAS_CONTENT | CHUNKED, HAS_CONTENT, 0, HAS_CONTENT | HINT_ONLY][n % 4]
        entry = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                 os.urandom(32) if flags & HAS_CONTENT else NO_CONTENT, flags)
        if n % 7 == 3:  # a stale entry: another size
            entry = (st.st_size + 1, *entry[1:])
        cache[os.fsencode(rel)] = entry
    handled = []
    real = scan.match

    def counting(prefix, entries, *rest):  # type: ignore[no-untyped-def]
        out = real(prefix, entries, *rest)
        handled.append(len(entries) - len(out[0]))
        return out

    monkeypatch.setattr(scan, "match", counting)
    c_side = _walked(top, cache, True, monkeypatch)
    monkeypatch.setattr(scan, "match", real)
    py_side = _walked(top, cache, False, monkeypatch)
    assert c_side == py_side
    assert sum(handled) > 20  # most files were vouched for in C
    hexes = [r[7] for r in c_side[0]["sub"] if r[7]]
    assert hexes and all(len(h) == 64 and h == h.lower() for h in hexes)


def test_match_rejects_what_is_not_a_listing() -> None:
    with pytest.raises(TypeError):
        scan.match(b"", [("name", 0o100644)], {}, {}, [], "f", 4, 2, 1)
    with pytest.raises(TypeError):
        scan.match("not bytes", [], {}, {}, [], "f", 4, 2, 1)


def test_a_walk_tells_an_unreusable_folder_whatever_its_order(monkeypatch) -> None:
    """An empty file not in the cache makes its folder's tree be made again (NOT_REUSED);
    a matched file's ctime past that mark must not hide it, whichever is seen first."""
    from dotmesh.meta.statcache import HAS_CONTENT
    from dotmesh.workdir import snapshot

    far = snapshot.NOT_REUSED + 5  # a ctime past 2116
    empty = ("a", stat.S_IFREG | 0o644, 11, 1, 0, 0, 0, 1, 2)
    matched = ("b", stat.S_IFREG | 0o644, 12, 1, 0, 0, 5, 3, far)
    cache = {b"b": (5, 3, far, 12, bytes(32), HAS_CONTENT)}
    seen = []
    for compiled in (True, False):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(scan, "match", lambda prefix, entries, *rest: (entries, 0, 0))
            walk = snapshot._Walk("/nonexistent", dict(cache), None)
            walk.rows("", [empty, matched], [])
            seen.append(walk._newest)
    assert seen == [snapshot.NOT_REUSED, snapshot.NOT_REUSED]


class _Meddler(int):
    """An int whose comparison empties the dict it came from (what a hostile entry could)."""

    victim: dict = {}

    def __eq__(self, other: object) -> bool:
        _Meddler.victim.clear()
        return int(self) == other

    __hash__ = int.__hash__


def test_match_keeps_what_it_reads_alive_while_comparing() -> None:
    entries = [(f"f{i}", stat.S_IFREG | 0o644, i, 1, 0, 0, 7, 1, 2) for i in range(50)]
    cache = {os.fsencode(f"f{i}"): (_Meddler(7), 1, 2, i, bytes(range(32)), 2)
             for i in range(50)}
    _Meddler.victim = cache
    hits: dict = {}
    rows: list = []
    rest, size, newest = scan.match(b"", entries, cache, hits, rows, "f", 4, 2, 1)
    assert [r[0] for r in rows] == ["f0"]  # the first emptied the cache: no more matches
    assert rows[0][7] == bytes(range(32)).hex() and size == 7 and newest == 2
    assert len(rest) == 49 and hits[b"f0"][0] == 7
