"""``dm mount``: a commit as a read-only folder, served by FUSE from the store.

Every subdot is a folder at the top. Nothing is copied: a folder's tree is read when it is
first looked at, a file's chunks when its bytes are read (each verified against its id), so
a 2 GiB commit mounts at once and reading one file reads only its blocks. The process runs
detached (``python -m`` this module, started by ``dm mount``) until ``dm umount`` unmounts
it; meta.db names the mounted commit meanwhile, so gc keeps it.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotmesh.capture.proc import alive as process_alive
from dotmesh.capture.proc import send as send_signal
from dotmesh.errors import AlreadyExists, DotmeshError, NotFound, UsageError
from dotmesh.heap import long_running
from dotmesh.meta import refs
from dotmesh.meta.db import Tx
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import DIR, FILE, Entry, FileList, Root, Tree
from dotmesh.store.repo import Repo

CHUNK_CACHE = 64  # chunks kept decoded (a sequential reader asks for 128 KiB at a time)
TIMEOUT = 3600.0  # a commit never changes: the kernel may keep what it was told
START_TIMEOUT = 15.0  # for the server to mount, or say why not


@dataclass
class _Node:
    kind: str  # "d", "f" or "l"
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    ref: bytes | str | None = None  # a tree (folders), content (files), target (symlinks)
    chunked: bool = False
    children: dict[bytes, int] | None = None  # name -> inode, once listed
    offsets: list[int] | None = None  # where each chunk of a chunked file starts
    chunks: list[tuple[ObjectId, int]] = field(default_factory=list)


def _node(e: Entry) -> _Node:
    return _Node(e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref, e.chunked)


class View:
    """The inodes of one commit, made as the kernel asks for them (no FUSE here: the
    filesystem below only translates)."""

    def __init__(self, home: Repo, subdots: dict[str, Root], top_mtime_ns: int) -> None:
        self.home = home
        self.nodes: dict[int, _Node] = {1: _Node(DIR, 0o555, os.getuid(), os.getgid(),
                                                 top_mtime_ns, children={})}
        for name, root in sorted(subdots.items()):
            self._add(1, name.encode(), _Node(DIR, root.mode, root.uid, root.gid,
                                              root.mtime_ns, ref=root.tree))
        self.cache: OrderedDict[ObjectId, bytes] = OrderedDict()

    def _add(self, parent: int, name: bytes, node: _Node) -> int:
        ino = len(self.nodes) + 1
        self.nodes[ino] = node
        children = self.nodes[parent].children
        assert children is not None
        children[name] = ino
        return ino

    def node(self, ino: int) -> _Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "no such inode") from None

    def children(self, ino: int) -> dict[bytes, int]:
        n = self.node(ino)
        if n.kind != DIR:
            raise OSError(errno.ENOTDIR, "not a folder")
        if n.children is None:
            n.children = {}
            assert isinstance(n.ref, bytes)
            for e in Tree.decode(self.home.packs.get(ObjectId(n.ref))).entries:
                self._add(ino, os.fsencode(e.name), _node(e))
        return n.children

    def lookup(self, parent: int, name: bytes) -> int:
        ino = self.children(parent).get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such name")
        return ino

    def read(self, ino: int, offset: int, size: int) -> bytes:
        n = self.node(ino)
        if n.kind != FILE:
            raise OSError(errno.EISDIR if n.kind == DIR else errno.EINVAL, "not a file")
        end = min(n.size, offset + size)
        if offset >= end or n.ref is None:
            return b""
        assert isinstance(n.ref, bytes)
        if not n.chunked:
            return self._chunk(ObjectId(n.ref))[offset:end]
        if n.offsets is None:
            n.chunks = list(FileList.decode(self.home.packs.get(ObjectId(n.ref))).chunks)
            n.offsets = [0, *itertools.accumulate(length for _, length in n.chunks[:-1])]
        i = bisect.bisect_right(n.offsets, offset) - 1
        out = bytearray()
        while i < len(n.chunks) and n.offsets[i] < end:
            cid, length = n.chunks[i]
            data = bytes(length) if cid == HOLE else self._chunk(cid)
            start = n.offsets[i]
            out += data[max(0, offset - start):end - start]
            i += 1
        return bytes(out)

    def _chunk(self, cid: ObjectId) -> bytes:
        data = self.cache.get(cid)
        if data is None:
            data = self.home.packs.get(cid)  # verified against its id
            self.cache[cid] = data
            if len(self.cache) > CHUNK_CACHE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(cid)
        return data


def _operations(view: View) -> Any:
    """The FUSE side: pyfuse3's callbacks over a :class:`View`, read-only."""
    import pyfuse3

    def fail(e: OSError) -> pyfuse3.FUSEError:
        return pyfuse3.FUSEError(e.errno or errno.EIO)

    class Operations(pyfuse3.Operations):
        def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
            n = view.node(ino)
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.st_mode = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG}.get(n.kind, stat.S_IFLNK) | (
                n.mode & 0o7777)
            a.st_nlink = 2 if n.kind == DIR else 1
            a.st_uid, a.st_gid = n.uid, n.gid
            a.st_size = (n.size if n.kind == FILE else 0 if n.kind == DIR
                         else len(os.fsencode(str(n.ref))))
            a.st_blksize = 4096
            a.st_blocks = (a.st_size + 511) // 512
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
            a.attr_timeout = a.entry_timeout = TIMEOUT
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            try:
                return self._attrs(inode)
            except OSError as e:
                raise fail(e) from None

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                         ) -> pyfuse3.EntryAttributes:
            try:
                return self._attrs(view.lookup(parent_inode, name))
            except OSError as e:
                raise fail(e) from None

        async def opendir(self, inode: int, ctx: Any) -> int:
            try:
                view.children(inode)
            except OSError as e:
                raise fail(e) from None
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            items = list(view.children(fh).items())
            for i, (name, ino) in enumerate(items[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i):
                    break

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            n = view.node(inode)
            if n.kind == DIR or n.kind == FILE:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(str(n.ref))

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            fi = pyfuse3.FileInfo(fh=inode)
            fi.keep_cache = True  # a commit's bytes never change
            return fi

        async def read(self, fh: int, off: int, size: int) -> bytes:
            try:
                return view.read(fh, off, size)
            except OSError as e:
                raise fail(e) from None
            except Exception:  # noqa: BLE001 - damaged data: an I/O error, not a crash
                raise pyfuse3.FUSEError(errno.EIO) from None

        async def access(self, inode: int, mode: int, ctx: Any) -> bool:
            return not mode & os.W_OK

    return Operations()


def serve(home: Path, dot: str, commit: str, mountpoint: str, ready: int) -> None:
    """Mount ``commit`` of ``dot`` at ``mountpoint`` and serve it until it is unmounted;
    "ok" or an error line is written to the descriptor ``ready`` once it is known."""
    import pyfuse3
    import trio

    long_running()
    try:
        repo = Repo(home)
        oid = ObjectId(bytes.fromhex(commit))
        cm = repo.commit(oid)
        view = View(repo, cm.subdots, cm.timestamp_ns)
        options = set(pyfuse3.default_options) | {"fsname=dm", "subtype=dm", "ro"}
        if os.getuid() == 0:  # root's mounts are for the users it runs servers as, too
            options.add("allow_other")
        pyfuse3.init(_operations(view), mountpoint, options)
    except Exception as e:  # noqa: BLE001 - told to dm mount, which prints it
        os.write(ready, f"{type(e).__name__}: {e}\n".encode())
        raise SystemExit(1) from None
    os.write(ready, b"ok\n")
    os.close(ready)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


@dataclass(frozen=True)
class Mounted:
    folder: str
    dot: str
    commit: ObjectId
    pid: int
    created_ns: int

    @property
    def serving(self) -> bool:
        """Whether the process serving it still runs (a zombie serves nothing)."""
        return self.pid > 0 and process_alive(self.pid)


def mounted(home: Repo, dot: str | None = None) -> list[Mounted]:
    out = []
    for folder, owner, commit, pid, created in refs.view_rows(home.conn, dot):
        if isinstance(commit, bytes) and len(commit) == 32:
            out.append(Mounted(str(folder), str(owner), ObjectId(commit), int(pid),
                               int(created)))
    return out


def start(home: Repo, dot: str, ref: str, folder: Path) -> Mounted:
    """Mount the commit ``ref`` names at ``folder`` (an empty folder) and return once it is
    served. Its row in meta.db comes first, so gc keeps the commit from the start."""
    import importlib.util

    if importlib.util.find_spec("pyfuse3") is None:  # not imported here: the server does
        raise UsageError("dm mount needs FUSE: install fuse3 and dm with its mount extra "
                         "(pip install 'dotmesh[mount]')")
    oid = home.resolve(dot, ref)
    where = str(folder.absolute().parent.resolve() / folder.name)
    target = _open_mount_point(Path(where))
    try:
        if any(m.folder == where for m in mounted(home)):
            raise AlreadyExists(f"a commit is mounted at {where} already: dm umount {where}")
        with Tx(home.conn) as tx:
            refs.add_view(tx, where, dot, oid, time.time_ns())
        # The server mounts on the folder held open here, not on a path someone could
        # swap for a symlink meanwhile.
        on = f"/proc/self/fd/{target}" if os.geteuid() == 0 else where
        return _spawn(home, dot, oid, where, on, target)
    finally:
        os.close(target)


def _open_mount_point(folder: Path) -> int:
    """The empty folder to mount on, opened (not followed through a symlink); refused where
    another user could swap it for something else (theirs, or in a folder they may write
    to that is not sticky)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise NotFound(f"{folder} is not a folder: make an empty one to mount on") from None
    try:
        me = {0, os.geteuid()}
        st, up = os.fstat(fd), os.stat(folder.parent)
        if st.st_uid not in me or up.st_uid not in me or (
                up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX):
            raise UsageError(f"{folder} or the folder it is in belongs to or may be changed "
                             "by another user: mount on a folder of your own")
        if os.listdir(fd):
            raise AlreadyExists(f"{folder} is not empty: mount on an empty folder")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _spawn(home: Repo, dot: str, oid: ObjectId, where: str, on: str, target: int) -> Mounted:
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", __spec__.name, str(home.root), dot, oid.hex(), on,
             str(w)], pass_fds=(w, target), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        os.close(w)
        w = -1
        answer = b""
        deadline = time.monotonic() + START_TIMEOUT
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            more = os.read(r, 4096)
            if not more:
                break
            answer += more
        if answer != b"ok\n":
            proc.kill()
            proc.wait()
            why = answer.decode(errors="replace").strip() or "no answer"
            raise DotmeshError(f"could not mount {oid.hex()[:12]} at {where}: {why}")
    except BaseException:
        with Tx(home.conn) as tx:
            refs.delete_view(tx, where)
        raise
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    with Tx(home.conn) as tx:
        refs.set_view_pid(tx, where, proc.pid)
    return next(m for m in mounted(home) if m.folder == where)


def _fuse_mounted(where: str) -> bool:
    """Whether a dm FUSE filesystem is mounted at ``where`` (from the mount table: a dead
    server's mount still counts, and nothing is followed)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                           fields.split(" ")[4])
            if point == where and rest.startswith("fuse.dm "):
                return True
    return False


def stop(home: Repo, folder: Path) -> Mounted:
    """Unmount what ``dm mount`` mounted at ``folder`` (also when its server died). The
    record goes only once nothing dm mounted is left there."""
    where = str(folder.absolute().parent.resolve() / folder.name)
    found = next((m for m in mounted(home) if m.folder == where), None)
    if found is None:
        raise NotFound(f"no commit is mounted at {where} (dm mount lists them)")
    if _fuse_mounted(where):
        done = subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if _fuse_mounted(where):
            raise DotmeshError(f"could not unmount {where}: {done.stderr.strip()}")
    elif found.serving:  # mounted elsewhere than recorded: end its server, which ends it
        send_signal(found.pid, signal.SIGTERM)  # (it may have ended meanwhile)
    with Tx(home.conn) as tx:
        refs.delete_view(tx, where)
    return found  # its server ends by itself once unmounted


def main() -> None:
    home, dot, commit, mountpoint, ready = sys.argv[1:6]
    serve(Path(home), dot, commit, mountpoint, int(ready))


if __name__ == "__main__":
    main()
