"""Make a folder equal to a stored tree, touching only what differs.

The caller passes the tree the folder holds now (a snapshot it just took), so equal subtrees are
skipped by id without a look at the disk, and a changed database file is patched in place chunk by
chunk: the cost follows the changed bytes, not the folder's size. Folder attributes are applied
last, deepest first, since creating entries changes a folder's mtime.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.model.objects import DIR, HOLE, SYMLINK, Entry, FileList, ObjectId, Root, Tree
from dotmesh.store.packs import RECORD, Location, PackStore
from dotmesh.workdir.snapshot import CacheEntry, StatCache, shared_pool

READ_RUN = 8 << 20  # read adjacent pack records in runs of up to this many bytes
_IS_ROOT = os.geteuid() == 0
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@dataclass
class RestoreResult:
    files_written: int = 0
    bytes_written: int = 0
    removed: int = 0
    touched: dict[bytes, CacheEntry] = field(default_factory=dict)
    removed_paths: set[bytes] = field(default_factory=set)
    removed_dirs: list[bytes] = field(default_factory=list)  # each ends with b"/"


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_PUNCH, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)  # the filesystem cannot punch: write zeros


class _Restorer:
    def __init__(self, store: PackStore, progress: Callable[[int], None] | None) -> None:
        self.store = store
        self.progress = progress
        self.result = RestoreResult()
        self.file_jobs: list[tuple[str, bytes, Entry, Entry | None]] = []
        self.dir_attrs: list[tuple[str, int, int, int, int]] = []  # children before parents
        self.locations: dict[bytes, Location] = {}

    def tree(self, oid: ObjectId | str | None) -> dict[str, Entry]:
        if not isinstance(oid, bytes):
            return {}
        return {e.name: e for e in Tree.decode(self.store.get(oid)).entries}

    def chunks(self, e: Entry) -> list[tuple[ObjectId, int]]:
        if e.ref is None or not isinstance(e.ref, bytes):
            return []
        if not e.chunked:
            return [(e.ref, e.size)]
        return list(FileList.decode(self.store.get(e.ref)).chunks)

    # -- planning (single thread): removals, folders and links now, file contents later
    def sync_dir(self, path: str, rel: bytes, cur: ObjectId | None, tgt: ObjectId) -> None:
        cur_entries, tgt_entries = self.tree(cur), self.tree(tgt)
        for name, c in cur_entries.items():
            t = tgt_entries.get(name)
            if t is None or t.kind != c.kind:
                self.remove(os.path.join(path, name), rel + os.fsencode(name), c)
        for name, t in tgt_entries.items():
            c = cur_entries.get(name)
            if c is not None and c.kind != t.kind:
                c = None
            self.sync_entry(os.path.join(path, name), rel + os.fsencode(name), c, t)

    def remove(self, path: str, rel: bytes, c: Entry) -> None:
        self.result.removed += 1
        try:
            if c.kind == DIR and not os.path.islink(path):
                shutil.rmtree(path)
                self.result.removed_dirs.append(rel + b"/")
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self.result.removed_paths.add(rel)

    def sync_entry(self, path: str, rel: bytes, c: Entry | None, t: Entry) -> None:
        if t.kind == DIR:
            if c is None:
                _mkdir_fresh(path)
            if c is None or c.ref != t.ref:
                assert isinstance(t.ref, bytes)
                self.sync_dir(path, rel + b"/", c.ref if c else None, ObjectId(t.ref))
            if c is None or c.ref != t.ref or _attrs(c) != _attrs(t):
                self.dir_attrs.append((path, t.mode, t.uid, t.gid, t.mtime_ns))
        elif t.kind == SYMLINK:
            if c is None or c.ref != t.ref:
                if c is not None or os.path.lexists(path):
                    _unlink_any(path)
                assert isinstance(t.ref, str)
                os.symlink(t.ref, path)
            elif _attrs(c) == _attrs(t):
                return
            _chown(path, t.uid, t.gid, follow=False)
            os.utime(path, ns=(t.mtime_ns, t.mtime_ns), follow_symlinks=False)
        elif c is not None and c.ref == t.ref and c.size == t.size:
            if _attrs(c) != _attrs(t):
                _chown(path, t.uid, t.gid)
                os.chmod(path, t.mode)
                os.utime(path, ns=(t.mtime_ns, t.mtime_ns))
                self.note(path, rel, t)
        else:
            self.file_jobs.append((path, rel, t, c))

    def note(self, path: str, rel: bytes, t: Entry) -> None:
        st = os.lstat(path)
        self.result.touched[rel] = CacheEntry.of(st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                              st.st_ino, t.ref if isinstance(t.ref, bytes)
                                              else None, int(t.chunked))

    # -- file contents (thread pool)
    def plan(self) -> list[tuple[str, bytes, Entry, bool, list[tuple[int, bytes, int]]]]:
        """For each file to write: whether in place, and the (offset, id, length) to write.

        Locations of every chunk are looked up in one go, before the writing threads start.
        """
        plans = []
        for path, rel, t, c in self.file_jobs:
            old: dict[int, tuple[bytes, int]] = {}
            in_place = c is not None and c.chunked and t.chunked and _is_regular(path)
            if in_place:
                assert c is not None
                off = 0
                for cid, n in self.chunks(c):
                    old[off] = (cid, n)
                    off += n
            wanted, off = [], 0
            for cid, n in self.chunks(t):
                if old.get(off) != (cid, n):
                    wanted.append((off, cid, n))
                off += n
            plans.append((path, rel, t, in_place, wanted))
        self.locations = self.store.locate_all(
            cid for *_, wanted in plans for _, cid, _ in wanted if cid != HOLE)
        return plans

    def _contents(self, wanted: list[tuple[int, bytes, int]]) -> Iterator[tuple[int, bytes, int,
                                                                              bytes | None]]:
        """(offset, id, length, data) in file order; adjacent records read in one go."""
        run: list[tuple[int, bytes, int, Location]] = []
        size = 0

        def flush() -> Iterator[tuple[int, bytes, int, bytes | None]]:
            if not run:
                return
            datas = self.store.read_run([(cid, loc) for _, cid, _, loc in run])
            for (off, cid, n, _), data in zip(run, datas, strict=True):
                yield off, cid, n, data
            run.clear()

        for off, cid, n in wanted:
            loc = self.locations.get(cid) if cid != HOLE else None
            if loc is None:
                yield from flush()
                size = 0
                yield off, cid, n, (None if cid == HOLE else self.store.get(cid))
                continue
            if run and (loc.pack != run[-1][3].pack or size > READ_RUN
                        or loc.offset != run[-1][3].offset + run[-1][3].stored_len + RECORD.size):
                yield from flush()
                size = 0
            run.append((off, cid, n, loc))
            size += loc.stored_len
        yield from flush()

    def write_file(self, path: str, rel: bytes, t: Entry, in_place: bool,
                   wanted: list[tuple[int, bytes, int]]) -> int:
        if in_place:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(path, flags, 0o600)
            except IsADirectoryError:  # a folder appeared there since the snapshot
                shutil.rmtree(path)
                fd = os.open(path, flags, 0o600)
        written = 0
        iov: list[bytes] = []
        iov_at = iov_end = 0
        try:
            for off, _, n, data in self._contents(wanted):
                if iov and (off != iov_end or len(iov) >= 1024):
                    _pwritev_all(fd, iov, iov_at)
                    iov = []
                if data is None:  # a hole
                    if in_place:
                        _punch_hole(fd, off, n)
                    continue
                if not iov:
                    iov_at = off
                iov.append(data)
                iov_end = off + n
                written += n
            if iov:
                _pwritev_all(fd, iov, iov_at)
            os.ftruncate(fd, t.size)
            _chown_fd(fd, t.uid, t.gid)
            os.fchmod(fd, t.mode)
            os.utime(fd, ns=(t.mtime_ns, t.mtime_ns))
        finally:
            os.close(fd)
        self.note(path, rel, t)
        if self.progress:
            self.progress(written)
        return written


def _pwritev_all(fd: int, iov: list[bytes], offset: int) -> None:
    done = os.pwritev(fd, iov, offset)
    want = sum(len(b) for b in iov)
    if done < want:  # a short write: finish the rest piece by piece
        rest = b"".join(iov)[done:]
        offset += done
        while rest:
            k = os.pwrite(fd, rest, offset)
            rest, offset = rest[k:], offset + k


def _attrs(e: Entry) -> tuple[int, int, int, int]:
    return (e.mode, e.uid, e.gid, e.mtime_ns)


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _mkdir_fresh(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if os.path.isdir(path) and not os.path.islink(path):
            return
        os.unlink(path)
        os.mkdir(path, 0o700)


def _unlink_any(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _chown(path: str, uid: int, gid: int, follow: bool = True) -> None:
    try:
        os.chown(path, uid, gid, follow_symlinks=follow)
    except PermissionError:
        if _IS_ROOT:
            raise  # a non-root user keeps their own ids, as tar does


def _chown_fd(fd: int, uid: int, gid: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        if _IS_ROOT:
            raise


def restore(top: Path, store: PackStore, target: Root, current: Root | None,
            progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Make ``top`` hold ``target``; ``current`` is what it holds now (None: treat as empty)."""
    r = _Restorer(store, progress)
    top_s = str(top)
    os.makedirs(top_s, exist_ok=True)
    if current is None or current.tree != target.tree:
        r.sync_dir(top_s, b"", current.tree if current else None, target.tree)
    plans = r.plan()
    for n in shared_pool().map(lambda job: r.write_file(*job), plans):
        r.result.bytes_written += n
        r.result.files_written += 1
    for path, mode, uid, gid, mtime_ns in r.dir_attrs:
        _chown(path, uid, gid)
        os.chmod(path, mode)
        os.utime(path, ns=(mtime_ns, mtime_ns))
    _chown(top_s, target.uid, target.gid)
    os.chmod(top_s, target.mode)
    os.utime(top_s, ns=(target.mtime_ns, target.mtime_ns))
    return r.result


def merge_cache(old: StatCache, result: RestoreResult) -> StatCache:
    """The stat cache after a restore: old entries minus removed paths, plus written files."""
    gone, dirs = result.removed_paths, tuple(result.removed_dirs)
    new = {k: v for k, v in old.items() if k not in gone and not (dirs and k.startswith(dirs))}
    new.update(result.touched)
    return new


__all__ = ["RestoreResult", "merge_cache", "restore"]
