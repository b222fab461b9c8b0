"""A hostile hub (a test double speaking the hub's API) cannot damage the client's store:
whatever it sends wrong, clone and pull fail with one line, no ref moves and nothing outside
the store is touched; what it sends right but dangerous (setuid bits, owners) is defused."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
import zstandard
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dotmesh.model.ids import HOLE, ObjectId, object_id
from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    MAX_CHUNK,
    SYMLINK,
    Commit,
    FileList,
    Root,
    encode_tree_rows,
)
from dotmesh.remote.wire import Record, encode
from dotmesh.store.packs import PACK_MAGIC, RECORD
from dotmesh.store.repo import Repo
from tests.conftest import DM, DM_BIN, raw_commit
from tests.integration.remote_env import free_port

pytestmark = pytest.mark.slow  # a hub double per test, clones of crafted states: seconds each

Objects = dict[bytes, tuple[int, bytes]]
Mutate = Callable[[list[Record]], bytes]


def honest(records: list[Record]) -> bytes:
    return encode(records)


class EvilHub:
    """Serves ``objects`` for dot evil/app, passing every answer through ``mutate``."""

    def __init__(self, objects: Objects, head: bytes) -> None:
        self.objects, self.head = objects, head
        self.mutate: Mutate = honest  # answers to fetch
        self.mutate_history: Mutate = honest
        self.branches: dict[str, str] = {"master": head.hex()}
        self.tags: dict[str, object] = {}
        self.error: str | None = None  # answer every fetch with this error
        self.port = free_port()

    def records(self, ids: list[bytes]) -> list[Record]:
        return [Record(self.objects[i][0], i, len(self.objects[i][1]), self.objects[i][1],
                       False) for i in ids if i in self.objects]

    def app(self) -> Starlette:
        async def user(request: Request) -> Response:
            return JSONResponse({"name": "mallory"})

        async def dot(request: Request) -> Response:
            return JSONResponse({"namespace": "evil", "name": "app", "owner": "evil",
                                 "branches": self.branches, "tags": self.tags,
                                 "collaborators": []})

        async def history(request: Request) -> Response:
            self.asked = bytes.fromhex(request.path_params["commit"])
            commits = [i for i, (k, _) in self.objects.items() if k == KIND_COMMIT]
            return Response(self.mutate_history(self.records(commits)))

        async def fetch(request: Request) -> Response:
            if self.error is not None:
                return JSONResponse({"error": self.error}, status_code=400)
            body = await request.body()
            ids = [body[i + 1:i + 33] for i in range(0, len(body), 33)]
            return Response(self.mutate(self.records(ids)))

        base = "/api/v1/dots/{ns}/{dot}"
        return Starlette(routes=[
            Route("/api/v1/user", user), Route(base, dot),
            Route(base + "/history/{commit}", history),
            Route(base + "/fetch", fetch, methods=["POST"])])

    def __enter__(self) -> EvilHub:
        self.server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1",
                                                    port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()


def _tree(rows: list[list[object]]) -> tuple[bytes, bytes]:
    try:
        data = encode_tree_rows(rows)
    except UnicodeEncodeError:  # a name no file system holds: dm would never encode it
        data = b"DMT1\n" + json.dumps(rows, separators=(",", ":")).encode()
    return object_id(data), data


def _commit(tree: bytes, subdot: str = "db", metadata: dict[str, str] | None = None,
            mode: int = 0o755, uid: int = 0) -> tuple[bytes, bytes]:
    data = raw_commit((), {subdot: Root(ObjectId(tree), mode, uid, uid, 1)}, "evil", "mallory",
                      1, metadata)
    return object_id(data), data


GOOD = b"honest content"
GOOD_ID = object_id(GOOD)
GOOD_ROWS: list[list[object]] = [["f", FILE, 0o644, 0, 0, 1, len(GOOD), GOOD_ID.hex(), 0]]


def _link(name: str, target: str) -> list[object]:
    return [name, SYMLINK, 0o777, 0, 0, 1, 0, target, 0]


def _filelist(chunks: list[tuple[bytes, int]]) -> tuple[bytes, bytes]:
    data = FileList(tuple((ObjectId(c), n) for c, n in chunks)).encode()
    return object_id(data), data


def _nested(depth: int) -> tuple[list[list[object]], Objects]:
    """Rows of a folder nested ``depth`` deep, and the trees beneath it."""
    objects: Objects = {}
    tid, data = _tree([])
    objects[tid] = (KIND_TREE, data)
    for _ in range(depth - 1):
        tid, data = _tree([["d", DIR, 0o755, 0, 0, 1, 0, tid.hex(), 0]])
        objects[tid] = (KIND_TREE, data)
    return [["d", DIR, 0o755, 0, 0, 1, 0, tid.hex(), 0]], objects


LIST_OF_1TIB = _filelist([(GOOD_ID, len(GOOD))])  # a true list of 14 bytes...
HOLE_OF_4GIB = _filelist([(HOLE, (1 << 32) - 1)])  # ...and one with a hole no chunker makes
LONG_BLOCK = _filelist([(GOOD_ID, 4096), (GOOD_ID, 4096)])  # blocks said longer than they are
# the victim's own block (its file "mine"), which the hub need not send, said longer than it is
LONG_HELD = _filelist([(object_id(b"precious"), 4096), (object_id(b"precious"), 4096)])
TWO_LENGTHS = _filelist([(GOOD_ID, len(GOOD)), (GOOD_ID, len(GOOD) + 1)])  # one block, two sizes
DEEP_ROWS, DEEP_TREES = _nested(300)
EVIL_PATH = Path(tempfile.gettempdir()) / f"dm-evil-{uuid.uuid4().hex[:12]}"  # must stay absent


def _flip_chunk(records: list[Record]) -> bytes:
    return encode([Record(r.kind, r.oid, r.raw_len, b"X" + bytes(r.payload)[1:], r.zstd)
                   if r.kind == KIND_CHUNK else r for r in records])


def _unasked(records: list[Record]) -> bytes:
    extra = b"never asked for"
    return encode([*records, Record(KIND_CHUNK, object_id(extra), len(extra), extra, False)])


def _oversized(records: list[Record]) -> bytes:
    if all(r.oid != GOOD_ID for r in records):
        return encode(records)
    head = RECORD.pack(KIND_CHUNK, 0, GOOD_ID, MAX_CHUNK + 1, 10)
    return PACK_MAGIC + head + b"0123456789"


def _bomb(records: list[Record]) -> bytes:
    """A chunk that claims 256 KiB, in a frame that does not say its size and inflates to
    64 MiB: the client may allocate at most what it was told."""
    if all(r.oid != GOOD_ID for r in records):
        return encode(records)
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    return PACK_MAGIC + RECORD.pack(KIND_CHUNK, 1, GOOD_ID, MAX_CHUNK, len(bomb)) + bomb


def _twice(records: list[Record]) -> bytes:
    return encode([*records, *records])


def _huge_answer(records: list[Record]) -> bytes:
    return PACK_MAGIC + bytes(80 << 20)


def _truncated(records: list[Record]) -> bytes:
    return encode(records)[:-3]


def _not_a_pack(records: list[Record]) -> bytes:
    return b"<html>hello</html>"


def _wrong_kind(records: list[Record]) -> bytes:
    return encode([Record(KIND_TREE if r.kind == KIND_CHUNK else r.kind, r.oid, r.raw_len,
                          r.payload, r.zstd) for r in records])


def _stray_commit(records: list[Record]) -> bytes:
    other = Commit((), {}, "not in the history", "mallory", 2).encode()
    return encode([*records, Record(KIND_COMMIT, object_id(other), len(other), other, False)])


def _tag(commit: str = "", message: str = "a tag") -> dict[str, object]:
    return {"commit": commit, "message": message, "tagger": "mallory", "ts_ns": 1}


@dataclass
class Case:
    rows: list[list[object]]
    needle: str
    mutate: Mutate = honest
    history: bool = False  # mutate the history answer instead of fetch answers
    subdot: str = "db"
    metadata: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] | None = None
    tags: dict[str, dict[str, object]] | None = None  # "" as a commit: the head
    error: str | None = None
    extra: Objects = field(default_factory=dict)


CASES = {
    "a chunk that does not match its id": Case(GOOD_ROWS, "does not match its id", _flip_chunk),
    "an object that was not asked for": Case(GOOD_ROWS, "not asked for", _unasked),
    "an oversized object": Case(GOOD_ROWS, "over the 262144-byte limit", _oversized),
    "a decompression bomb": Case(GOOD_ROWS, "does not decompress", _bomb),
    "an object sent twice": Case(GOOD_ROWS, "twice", _twice),
    "an answer of 80 MiB": Case(GOOD_ROWS, "more than", _huge_answer),
    "a truncated batch": Case(GOOD_ROWS, "truncated", _truncated),
    "something else than objects": Case(GOOD_ROWS, "not a batch", _not_a_pack),
    "a chunk sent as a tree": Case(GOOD_ROWS, "where a chunk was expected", _wrong_kind),
    "a tree entry named ..": Case([["..", FILE, 0o644, 0, 0, 1, 0, None, 0]], "unsafe name"),
    "a tree entry with a slash": Case([["a/b", FILE, 0o644, 0, 0, 1, 0, None, 0]],
                                      "unsafe name"),
    "a tree entry no file system holds": Case([["\ud800", FILE, 0o644, 0, 0, 1, 0, None, 0]],
                                              "unsafe name"),
    "an absolute symlink": Case([_link("l", "/etc/passwd")], "points out of its subdot"),
    "a symlink climbing out": Case(
        [["sub", DIR, 0o755, 0, 0, 1, 0, _tree([_link("l", "../../x")])[0].hex(), 0]],
        "points out of its subdot",
        extra={_tree([_link("l", "../../x")])[0]: (KIND_TREE, _tree([_link("l", "../../x")])[1])}),
    "a chain of symlinks climbing out": Case(
        [_link("s0", "."), *[_link(f"s{i}", f"s{i - 1}/..") for i in range(1, 13)],
         _link("escape", "s12/etc/passwd")], "points out of its subdot"),
    "a commit outside the history": Case(GOOD_ROWS, "not in", _stray_commit, history=True),
    "a subdot named ../../x": Case(GOOD_ROWS, "subdot name", subdot="../../x"),
    "a subdot named by an absolute path": Case(GOOD_ROWS, "subdot name", subdot=str(EVIL_PATH)),
    "a metadata key with a newline": Case(GOOD_ROWS, "metadata key",
                                          metadata={"ticket\n": "x"}),
    "a branch named ../x": Case(GOOD_ROWS, "branch named badly",
                                branches={"master": "", "../x": ""}),
    # The other ways a tag can be made badly: tests/unit/test_tags.py (one function reads
    # them all, for hubs and buckets alike).
    "a tag named ../x": Case(GOOD_ROWS, "tag made badly", tags={"../x": _tag()}),
    "a tag naming a commit the hub lacks": Case(
        GOOD_ROWS, "did not send commit", tags={"t": _tag(commit=object_id(b"none").hex())}),
    "a file of 1 TiB said of 14 bytes": Case(
        [["f", FILE, 0o644, 0, 0, 1, 1 << 40, GOOD_ID.hex(), 0]], "size its content cannot"),
    "a file list of 14 bytes said 1 TiB": Case(
        [["f", FILE, 0o644, 0, 0, 1, 1 << 40, LIST_OF_1TIB[0].hex(), 1]],
        "where its content has 14",
        extra={LIST_OF_1TIB[0]: (KIND_FILELIST, LIST_OF_1TIB[1])}),
    "a hole of 4 GiB": Case(
        [["f", FILE, 0o644, 0, 0, 1, (1 << 32) - 1, HOLE_OF_4GIB[0].hex(), 1]],
        "length dm never makes", extra={HOLE_OF_4GIB[0]: (KIND_FILELIST, HOLE_OF_4GIB[1])}),
    "blocks said longer than they are": Case(
        [["f", FILE, 0o644, 0, 0, 1, 8192, LONG_BLOCK[0].hex(), 1]], "where its list says 4096",
        extra={LONG_BLOCK[0]: (KIND_FILELIST, LONG_BLOCK[1])}),
    "blocks held here said longer than they are": Case(
        [["f", FILE, 0o644, 0, 0, 1, 8192, LONG_HELD[0].hex(), 1]], "is not 4096 bytes long here",
        extra={LONG_HELD[0]: (KIND_FILELIST, LONG_HELD[1])}),
    "a block held here said longer by a tree": Case(
        [["f", FILE, 0o644, 0, 0, 1, 4096, object_id(b"precious").hex(), 0]],
        "is not 4096 bytes long here"),
    "a block said to have two lengths": Case(
        [["f", FILE, 0o644, 0, 0, 1, 2 * len(GOOD) + 1, TWO_LENGTHS[0].hex(), 1]],
        "is said to be", extra={TWO_LENGTHS[0]: (KIND_FILELIST, TWO_LENGTHS[1])}),
    "folders nested 300 deep": Case(DEEP_ROWS, "nested over 256", extra=DEEP_TREES),
    "an error message with terminal escapes": Case(GOOD_ROWS, "?[2J", error="\x1b[2Jgone"),
}


@pytest.fixture(scope="module")
def _victim(tmp_path_factory) -> tuple[Path, str]:
    """A store with one commit of its own and its log, made once: each case below attacks
    a copy of its own (a home holds its dots' folders and names no absolute path)."""
    dm = DM(tmp_path_factory.mktemp("victim") / "home")
    dm.ok("init", "app")
    (dm.path("app.db") / "mine").write_text("precious")
    dm.ok("commit", "-m", "mine")
    return dm.home, dm.ok("log", "--json")


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_hub_cannot_damage_the_store(tmp_path, _victim, case):
    c = CASES[case]
    extra: Objects = {GOOD_ID: (KIND_CHUNK, GOOD), **c.extra}
    tid, tdata = _tree(c.rows)
    cid, cdata = _commit(tid, c.subdot, c.metadata)
    objects: Objects = {tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata), **extra}
    dm = DM(tmp_path / "victim")
    shutil.copytree(_victim[0], dm.home, symlinks=True)
    before = _victim[1]
    outside = tmp_path / "outside"
    outside.mkdir()
    with EvilHub(objects, cid) as evil:
        if c.history:
            evil.mutate_history = c.mutate
        else:
            evil.mutate = c.mutate
        if c.branches is not None:
            evil.branches = {b: h or cid.hex() for b, h in c.branches.items()}
        if c.tags is not None:
            evil.tags = {n: {**t, "commit": t["commit"] or cid.hex()}
                         for n, t in c.tags.items()}
        evil.error = c.error
        p = _add_remote(dm, evil.port)
        assert p.returncode == 0, p.stderr
        p = dm("clone", "evil", "evil/app", "--local-name", "stolen")
        assert p.returncode != 0, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and c.needle in lines[0] and "Traceback" not in p.stderr, p.stderr
        assert "\x1b" not in p.stderr
        home = Repo(dm.home)
        try:
            assert home.remote_heads("app") == {}
            assert not home.dot_exists("stolen")
        finally:
            home.close()
        _track(dm, "app", "evil", "evil/app")
        p = dm("pull", "evil", "app")
        assert p.returncode != 0 and c.needle in p.stderr, p.stderr
    assert dm.ok("log", "--json") == before  # no ref moved
    assert (dm.path("app.db") / "mine").read_text() == "precious"
    assert json.loads(dm.ok("fsck", "--json"))["ok"]
    assert list(outside.iterdir()) == [] and not EVIL_PATH.exists()
    assert sorted(p.name for p in (dm.home / "dots").iterdir()) == ["app"]


def _honest_hub() -> EvilHub:
    """The double serving one honest commit: file ``f`` holding GOOD in subdot ``db``."""
    tid, tdata = _tree(GOOD_ROWS)
    cid, cdata = _commit(tid)
    return EvilHub({tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata),
                    GOOD_ID: (KIND_CHUNK, GOOD)}, cid)


def test_an_honest_double_works(tmp_path):
    """The double itself is right: with nothing corrupted, the clone succeeds."""
    dm = DM(tmp_path / "victim")
    with _honest_hub() as evil:
        assert _add_remote(dm, evil.port).returncode == 0
        dm.ok("clone", "evil", "evil/app")
    assert (dm.path("app.db") / "f").read_bytes() == GOOD


@pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be given away by root")
def test_a_pusher_chooses_neither_owners_nor_setuid_bits(tmp_path):
    """As tar does for an archive from elsewhere: a state from a remote is restored with the
    files owned by whoever runs dm, without setuid, setgid or sticky bits and with the user's
    umask applied, unless the dot was cloned with --same-owner; every later restore of that
    state does the same."""
    rows: list[list[object]] = [["f", FILE, 0o6755, 4242, 4242, 1, len(GOOD), GOOD_ID.hex(), 0],
                                ["d", DIR, 0o1777, 4242, 4242, 1, 0, _tree([])[0].hex(), 0],
                                ["g", FILE, 0o666, 4242, 4242, 1, len(GOOD), GOOD_ID.hex(), 0]]
    tid, tdata = _tree(rows)
    cid, cdata = _commit(tid, mode=0o2777, uid=4242)
    objects = {tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata), GOOD_ID: (KIND_CHUNK, GOOD),
               _tree([])[0]: (KIND_TREE, _tree([])[1])}
    dm = DM(tmp_path / "victim")
    umask = os.umask(0o027)  # dm inherits it
    try:
        with EvilHub(objects, cid) as evil:
            assert _add_remote(dm, evil.port).returncode == 0
            dm.ok("clone", "evil", "evil/app")
            dm.ok("clone", "evil", "evil/app", "--local-name", "trusted", "--same-owner")
        _check_stranger_attrs(dm, cid)
    finally:
        os.umask(umask)


def _check_stranger_attrs(dm: DM, cid: bytes) -> None:

    def attrs(p: Path) -> tuple[int, int, int]:
        st = os.lstat(p)
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    top = dm.path("app.db")
    assert attrs(top / "f") == (0o750, 0, 0) and attrs(top / "d") == (0o750, 0, 0)
    assert attrs(top / "g") == (0o640, 0, 0) and attrs(top) == (0o750, 0, 0)
    (top / "f").write_text("changed")
    os.chmod(top / "g", 0o600)
    dm.ok("reset", "--hard", cid.hex())  # the same state again: still defused
    assert attrs(top / "f") == (0o750, 0, 0) and attrs(top / "g") == (0o640, 0, 0)
    dm.ok("checkout", "-b", "other")
    assert attrs(dm.path("app.db") / "f") == (0o750, 0, 0)
    trusted = dm.path("trusted.db")
    assert attrs(trusted / "f") == (0o6755, 4242, 4242)
    assert attrs(trusted / "d") == (0o1777, 4242, 4242)
    assert attrs(trusted / "g") == (0o666, 4242, 4242)
    assert attrs(trusted) == (0o2777, 4242, 4242)


def test_a_pushers_words_cannot_drive_the_terminal(tmp_path):
    """Messages, authors, metadata and file names come from whoever pushed: dm shows their
    control characters, bidi overrides and stray bytes as escapes, and a message's later
    lines indented, so none can clear the screen, retitle the window or fake a line."""
    evil = "\x1b]0;pwned\x07\x1b[2J\r\u202egnp.exe\u2028\u200bend\x9b1m"
    name = "f\x1b[31m"
    rows: list[list[object]] = [[name, FILE, 0o644, 0, 0, 1, len(GOOD), GOOD_ID.hex(), 0]]
    tid, tdata = _tree(rows)
    cdata = raw_commit((), {"db": Root(ObjectId(tid), 0o755, 0, 0, 1)},
                       f"subject {evil}\ncommit 0000000000 (a faked line)", f"eve {evil}", 1,
                       {"note": evil})
    cid = object_id(cdata)
    objects = {tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata), GOOD_ID: (KIND_CHUNK, GOOD)}
    dm = DM(tmp_path / "victim")
    with EvilHub(objects, cid) as evil_hub:
        assert _add_remote(dm, evil_hub.port).returncode == 0
        dm.ok("clone", "evil", "evil/app")
    assert (dm.path("app.db") / name).read_bytes() == GOOD  # the file itself is as sent
    (dm.path("app.db") / name).unlink()
    shown = ""
    for args in (["log"], ["reflog"], ["list"], ["diff"], ["dot", "show"],
                 ["reset", "--hard", "HEAD"], ["log"]):
        p = dm(*args)
        assert p.returncode == 0, p.stderr
        shown += p.stdout + p.stderr
    for bad in ("\x1b", "\x07", "\r", "\u202e", "\u2028", "\u200b", "\x9b"):
        assert bad not in shown, (bad, shown)
    assert "f\\x1b[31m" in shown and "\\u202egnp.exe" in shown
    log = dm.ok("log")
    assert "\n    commit 0000000000 (a faked line)" in log  # indented: no line of dm's own
    assert not any(line.startswith("commit 0000000000") for line in log.splitlines())
    assert json.loads(dm.ok("log", "--json"))[0]["author"] == f"eve {evil}"  # data intact


def test_folders_a_killed_checkout_b_left_never_stand_in_for_a_pulled_branch(tmp_path):
    """A ``dm checkout -b feature`` killed after building its folders leaves them with no
    branch; a later pull that creates ``feature`` must not let them pose as its state."""
    dm = DM(tmp_path / "victim")
    with _honest_hub() as evil:
        assert _add_remote(dm, evil.port).returncode == 0
        dm.ok("clone", "evil", "evil/app")
        left = dm.home / "dots" / "app" / "branches" / "feature" / "db"
        left.mkdir(parents=True)
        (left / "f").write_text("what a killed checkout -b built")
        evil.branches["feature"] = evil.head.hex()
        dm.ok("pull", "evil", "app", "feature")
    dm.ok("checkout", "feature")
    assert (dm.path("app.db") / "f").read_bytes() == GOOD
    assert "No changes" in dm.ok("diff")


def test_a_damaged_row_of_a_block_held_here_stops_a_fetch_before_anything_is_written(
        tmp_path, _victim):
    """The blocks a hub's lists name and the receiver holds are checked against the index
    all at once; each row is checked whole, as a lookup of one would be: a row whose length
    was damaged to what the hub claims must not let the hub's list in."""
    import sqlite3

    held = object_id(b"precious")  # the victim's file "mine"
    listing = _filelist([(held, 4096)])
    tid, tdata = _tree([["f", FILE, 0o644, 0, 0, 1, 4096, listing[0].hex(), 1]])
    cid, cdata = _commit(tid)
    objects: Objects = {tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata),
                        listing[0]: (KIND_FILELIST, listing[1])}
    dm = DM(tmp_path / "victim")
    shutil.copytree(_victim[0], dm.home, symlinks=True)
    db = sqlite3.connect(dm.home / "meta.db")
    with db:
        damaged = sum(db.execute(f"UPDATE {t} SET raw_len=4096 WHERE id=?", (held,)).rowcount
                      for t in ("objects", "recent_objects"))
    db.close()
    assert damaged == 1
    with EvilHub(objects, cid) as evil:
        assert _add_remote(dm, evil.port).returncode == 0
        p = dm("clone", "evil", "evil/app", "--local-name", "stolen")
    assert p.returncode != 0 and "is damaged" in p.stderr and "Traceback" not in p.stderr
    home = Repo(dm.home)
    try:
        assert not home.dot_exists("stolen")
        assert home.packs.missing([listing[0], tid, cid]) == {listing[0], tid, cid}
    finally:
        home.close()


def _add_remote(dm: DM, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DM_BIN, "remote", "add", "evil", f"mallory@127.0.0.1:{port}",
                           "--http"], env={**dm.env, "DM_API_KEY": "k"}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def _track(dm: DM, dot: str, remote: str, remote_dot: str) -> None:
    """Make ``dot`` pull from ``remote_dot`` (as a clone or push would have recorded)."""
    home = Repo(Path(dm.home))
    try:
        home.conn.execute("INSERT OR REPLACE INTO dot_remotes VALUES (?, ?, ?)",
                          (dot, remote, remote_dot))
    finally:
        home.close()


def test_a_long_history_of_fat_commits_costs_the_client_one_answer(tmp_path):
    """240 commits of 1 MiB each (a few hundred bytes each once compressed), sent a hundred
    at a time as a hub does: the clone works, holding ids in memory, not commits (its peak
    stays under the history's 240 MiB)."""
    tid, tdata = _tree([])
    pad = "A" * ((1 << 20) - 600)
    chain: list[Record] = []
    parents: tuple[ObjectId, ...] = ()
    for i in range(240):
        data = Commit(parents, {"db": Root(ObjectId(tid), 0o755, 0, 0, 1)}, "m", "mallory", i,
                      {"pad": pad}).encode()
        oid = object_id(data)
        chain.append(Record(KIND_COMMIT, oid, len(data),
                            zstandard.ZstdCompressor().compress(data), True))
        parents = (ObjectId(oid),)
    where = {r.oid: i for i, r in enumerate(chain)}
    evil = EvilHub({tid: (KIND_TREE, tdata)}, chain[-1].oid)

    def history(records: list[Record]) -> bytes:  # the asked commit and 99 before it
        k = where[evil.asked]
        return encode(chain[max(0, k - 99):k + 1][::-1])

    evil.mutate_history = history
    dm = DM(tmp_path / "victim")
    with evil:
        assert _add_remote(dm, evil.port).returncode == 0
        proc = dm.popen("clone", "evil", "evil/app")
        peak = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM"):
                            peak = max(peak, int(line.split()[1]) << 10)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    assert len(json.loads(dm.ok("log", "--json"))) == 240
    assert peak < 200 << 20, f"the client's peak memory was {peak >> 20} MiB"
