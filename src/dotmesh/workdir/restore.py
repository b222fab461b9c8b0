"""Make a folder equal to a stored tree, touching only what differs, never through a link.

Two ways, both fed the tree the folder holds now (a snapshot just taken) so that equal subtrees
are skipped by id and a changed database file is patched block by block:

- :func:`build` writes a folder that does not exist yet (a clone, a branch's folders built
  aside): nothing there can be lost, so files go straight to their place.
- :func:`prepare` then :meth:`Prepared.apply` changes a folder in use (a reset). ``prepare``
  reads and verifies everything the restore needs before the folder is touched: whole files
  are written into a staging folder on the same filesystem, with their final attributes, and
  the blocks of files patched in place are read and checked (kept in memory up to
  PATCH_MEMORY). A damaged or missing object, or sizes that disagree, fail there, with the
  folder untouched. ``apply`` only renames, patches, removes and sets attributes; if it is
  killed, the caller's journal finishes it.

Every step works relative to folder descriptors opened with O_NOFOLLOW, so no link (in the
tree, or planted meanwhile) can send a write out of the folder, and files are only written in
place if they are regular files with a single link: anything else (a FIFO, a device node, a
hard link to a file elsewhere) is replaced, never opened for writing. Folder attributes are
applied last, deepest first, since creating entries changes a folder's mtime.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from dotmesh.errors import Conflict, Corrupt, NotFound
from dotmesh.heap import no_cycle_gc, private_buffer
from dotmesh.meta.statcache import FOLDER, CacheEntry, StatCache
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import DIR, SYMLINK, Entry, FileList, Root, Tree, differing_blocks
from dotmesh.store.packs import DIRECT_ALIGN, RECORD, Location, PackStore, location, set_direct
from dotmesh.workdir import forked
from dotmesh.workdir.snapshot import run_all

if TYPE_CHECKING:
    from dotmesh.meta.index import Row

READ_RUN = 8 << 20  # read adjacent pack records in runs of up to this many bytes
PATCH_MEMORY = 64 << 20  # verified blocks of in-place patches kept for apply; beyond, read twice
FORK_MIN = 64 << 20  # bytes a build writes from here on which its files go to child processes
# ... up to this many objects: each child ends up with its own copy of most pages holding the
# plan (reference counts change as it reads), some 40 MB a GiB of 8 KiB blocks
FORK_MAX_OBJECTS = 1 << 20
# Child processes of a split build, twice these machines' cores. Each child waits on the disk
# twice a batch (a direct read of its runs, a direct write of its blocks); with two, both cores
# often stood idle at once (2 GiB: 5.8-6.3 s, CPU 58% of two cores; four: 4.9-5.5 s). Each
# child holds its own copy of the plan's pages it touches (total PSS 452 -> 591 MiB).
WORKERS = 4
_IS_ROOT = os.geteuid() == 0
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
Progress = Callable[[int], None]
Parts = tuple[str, ...]  # a folder, as names from the top
Want = tuple[int, ObjectId, int]  # (offset, chunk id, length) to write


def _current_umask() -> int:
    """Read without changing it (setting it to read it back would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o077)
    os.umask(current)
    return current


@dataclass(frozen=True)
class Policy:
    """How a tree's attributes are applied: exactly (a state made on this machine), or, for a
    state that came from a remote without ``--same-owner``, as tar treats a stranger's archive:
    no setuid, setgid or sticky bits, the user's umask applied (a pusher cannot make a folder
    writable by everyone), and files owned by whoever runs dm."""

    foreign: bool = False
    umask: int = 0o022  # applied to foreign states only

    @classmethod
    def for_stranger(cls) -> Policy:
        return cls(foreign=True, umask=_current_umask())

    def mode(self, mode: int) -> int:
        return mode & 0o777 & ~self.umask if self.foreign else mode

    def attrs(self, e: Entry | Root) -> tuple[int, int, int, int]:
        """What applying ``e`` leaves: ownership is only compared when it is applied."""
        if self.foreign:
            return (self.mode(e.mode), -1, -1, e.mtime_ns)
        return (e.mode, e.uid, e.gid, e.mtime_ns)


@dataclass
class RestoreResult:
    files_written: int = 0
    bytes_written: int = 0
    removed: int = 0
    touched: dict[bytes, CacheEntry] = field(default_factory=dict)
    removed_paths: set[bytes] = field(default_factory=set)
    removed_dirs: list[bytes] = field(default_factory=list)  # each ends with b"/"


@dataclass
class _File:
    """A file whose content is (re)written: whole (staged, or straight to its place in a
    build), or patched in place at the offsets in ``wanted``."""

    parts: Parts
    name: str
    rel: bytes
    entry: Entry
    in_place: bool
    wanted: list[Want]
    staged: str = ""  # its name in the staging folder
    blocks: list[tuple[int, int, bytes | None]] | None = None  # verified, for a patch
    located: list[Location] | None = None  # of the blocks but holes, once checked


# Structural steps, replayed in order by apply (and by build, before the files).
Step = tuple[str, Parts, str, object]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_PUNCH, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)  # the filesystem cannot punch: write zeros


def _rel(parts: Parts, name: str) -> bytes:
    return os.fsencode("/".join((*parts, name)))


def _where(top: Path, parts: Parts, name: str = "") -> str:
    return os.path.join(str(top), *parts, name) if name else os.path.join(str(top), *parts)


class _Dirs:
    """Descriptors of the folders under ``top``, each opened relative to its parent without
    following links. Steps come in depth-first order, so only the current chain stays open."""

    def __init__(self, top: Path, top_fd: int) -> None:
        self.top = top
        self.fds: dict[Parts, int] = {(): top_fd}

    def get(self, parts: Parts) -> int:
        fd = self.fds.get(parts)
        if fd is not None:
            return fd
        for held in [p for p in self.fds if p and p != parts[:len(p)]]:
            os.close(self.fds.pop(held))
        parent = self.get(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ENOENT, errno.ELOOP):
                raise
            try:
                link = stat.S_ISLNK(os.stat(parts[-1], dir_fd=parent,
                                            follow_symlinks=False).st_mode)
            except OSError:
                link = False
            if link:
                raise Conflict(f"{_where(self.top, parts)} became a link during the restore; "
                               "nothing was written through it") from None
            raise Conflict(f"{_where(self.top, parts)} is not a folder any more (something "
                           f"changed it during the restore: {e.strerror})") from None
        self.fds[parts] = fd
        return fd

    def close(self) -> None:
        for parts, fd in self.fds.items():
            if parts:
                os.close(fd)
        self.fds = {}


def open_top(top: Path, create: bool) -> int:
    if create:
        os.makedirs(top, exist_ok=True)
    try:
        return os.open(top, _DIR_FLAGS)
    except OSError as e:
        raise Conflict(f"{top} is not a folder dm can restore into: {e.strerror}") from None


def _size_mismatch(e: Entry, size: int, rel: bytes) -> Corrupt:
    return Corrupt(f"{os.fsdecode(rel)} says {e.size} bytes but its content has {size}; "
                   "nothing was changed")


def _check_list_size(e: Entry, data: bytes, rel: bytes) -> None:
    """A file list that :func:`differing_blocks` accepted holds the bytes its entry says."""
    size = FileList.size_of(data)
    if size != e.size:
        raise _size_mismatch(e, size, rel)


class _Planner:
    """Compares the trees (no change to the folder): what to remove, make and write."""

    def __init__(self, top: Path, top_fd: int | None, store: PackStore, policy: Policy) -> None:
        self.top, self.top_fd, self.store, self.policy = top, top_fd, store, policy
        self.steps: list[Step] = []
        self.files: list[_File] = []
        self.dir_attrs: list[tuple[Parts, Entry]] = []  # children before parents
        self.removed: list[tuple[bytes, bool]] = []

    def tree(self, oid: ObjectId | str | None) -> dict[str, Entry]:
        if not isinstance(oid, bytes):
            return {}
        return {e.name: e for e in Tree.decode(self.store.get(oid)).entries}

    def chunks(self, e: Entry, rel: bytes, data: bytes | None = None
               ) -> list[tuple[ObjectId, int]]:
        """The (id, length) of ``e``'s blocks; ``data``: its file list, if already read."""
        if e.ref is None or not isinstance(e.ref, bytes):
            return []
        if not e.chunked:
            return [(e.ref, e.size)]
        fl = FileList.decode(self.store.get(e.ref) if data is None else data)
        if fl.size != e.size:
            raise _size_mismatch(e, fl.size, rel)
        return list(fl.chunks)

    def folder(self, parts: Parts, cur: ObjectId | None, tgt: ObjectId, exists: bool) -> None:
        cur_entries, tgt_entries = self.tree(cur), self.tree(tgt)
        for name, c in cur_entries.items():
            t = tgt_entries.get(name)
            if t is None or t.kind != c.kind:
                self.steps.append(("rm", parts, name, c.kind == DIR))
                rel = _rel(parts, name)
                self.removed.append((rel, c.kind == DIR))
        for name, t in tgt_entries.items():
            was = cur_entries.get(name)
            if was is not None and was.kind != t.kind:
                was = None
            self.entry(parts, name, was, t, exists)

    def entry(self, parts: Parts, name: str, c: Entry | None, t: Entry, exists: bool) -> None:
        rel = _rel(parts, name)
        if t.kind == DIR:
            if c is None:
                self.steps.append(("mkdir", parts, name, None))
            if c is None or c.ref != t.ref:
                assert isinstance(t.ref, bytes)
                cur = c.ref if c else None
                assert cur is None or isinstance(cur, bytes)  # a folder's ref is a tree id
                self.folder((*parts, name), cur, ObjectId(t.ref),
                            exists and c is not None)
            if c is None or c.ref != t.ref or self.policy.attrs(c) != self.policy.attrs(t):
                self.dir_attrs.append(((*parts, name), t))
        elif t.kind == SYMLINK:
            if c is None or c.ref != t.ref:
                self.steps.append(("link", parts, name, t))
            elif self.policy.attrs(c) != self.policy.attrs(t):
                self.steps.append(("linkattrs", parts, name, t))
        elif c is not None and c.ref == t.ref and c.size == t.size:
            if self.policy.attrs(c) != self.policy.attrs(t):
                self.steps.append(("attrs", parts, name, t))
        else:
            in_place = (exists and c is not None and c.chunked and t.chunked
                        and self._patchable(parts, name))
            wanted = self._wanted(c if in_place else None, t, rel)
            f = _File(parts, name, rel, t, in_place, wanted)
            self.files.append(f)
            self.steps.append(("patch" if in_place else "put", parts, name, f))

    def _wanted(self, c: Entry | None, t: Entry, rel: bytes) -> list[tuple[int, ObjectId, int]]:
        """The (offset, id, length) of the blocks of ``t`` to write: all of them, or, over
        ``c`` (the file's content now, patched in place), those it lacks at their offset."""
        old = new = None
        if c is not None and isinstance(c.ref, bytes) and isinstance(t.ref, bytes):
            old, new = self.store.get(c.ref), self.store.get(t.ref)
            wanted = differing_blocks(old, new)  # two paged files' lists, compared as bytes
            if wanted is not None:
                for e, data in ((c, old), (t, new)):
                    _check_list_size(e, data, rel)
                return wanted
        had: dict[int, tuple[bytes, int]] = {}
        if c is not None:
            off = 0
            for cid, n in self.chunks(c, rel, old):
                had[off] = (cid, n)
                off += n
        wanted, off = [], 0
        for cid, n in self.chunks(t, rel, new):
            if had.get(off) != (cid, n):
                wanted.append((off, cid, n))
            off += n
        return wanted

    def _patchable(self, parts: Parts, name: str) -> bool:
        """A regular file with no other name: writing it in place changes nothing else."""
        if self.top_fd is None:
            return False
        fd = self.top_fd
        opened: list[int] = []
        try:
            for p in parts:
                fd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                opened.append(fd)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            for x in opened:
                os.close(x)
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1

    def check_sizes(self, w: _Writer) -> None:
        """Every block is as long as its list says, every file as long as its content."""
        for f in self.files:
            check_file(f, w)


def check_file(f: _File, w: _Writer) -> list[Location]:
    """Every block of ``f`` is in the store and as long as its list says; their locations
    (kept on ``f`` for its writing, which then looks none up again). One loop with the
    writer's tables at hand: a full restore checks some 200,000 blocks here."""
    found: list[Location] = []
    locations, rows = w.locations, w.rows
    for _, cid, n in f.wanted:
        if cid == HOLE:
            continue
        loc = locations.get(cid)
        if loc is None:
            row = rows.get(cid)
            if row is None:
                raise NotFound(f"block {cid.hex()[:16]} of {os.fsdecode(f.rel)} is not in "
                               "the store; nothing was changed (dm fsck)")
            loc = locations[cid] = location(row)  # Corrupt if damaged
        if loc.raw_len != n:
            raise Corrupt(f"{os.fsdecode(f.rel)} names a block of {n} bytes that has "
                          f"{loc.raw_len}; nothing was changed (dm fsck)")
        found.append(loc)
    f.located = found
    return found


def _expect(progress: Progress | None, files: list[_File]) -> None:
    """Tell a meter that shows a total (cli/render.py) the bytes about to be written."""
    expect = getattr(progress, "expect", None)
    if expect is not None:
        expect(sum(f.entry.size for f in files))


READERS = 8  # threads reading a patched file's scattered blocks
SCATTERED_PIECE = 64  # blocks each of them is given at a time
_reader_pool: ThreadPoolExecutor | None = None
_reader_lock = threading.Lock()  # (several threads stage files at once)


def _readers() -> ThreadPoolExecutor:
    global _reader_pool
    with _reader_lock:
        if _reader_pool is None:
            _reader_pool = ThreadPoolExecutor(READERS, thread_name_prefix="dm-read")
        return _reader_pool


def _forget_readers() -> None:
    """In a forked child (the daemon's commands) the readers do not exist: start anew."""
    global _reader_pool, _reader_lock
    _reader_pool, _reader_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_readers)


class _Writer:
    """Reads what files need from the packs (verified) and writes it out."""

    def __init__(self, store: PackStore, policy: Policy, progress: Progress | None) -> None:
        self.store, self.policy, self.progress = store, policy, progress
        self.locations: dict[ObjectId, Location] = {}
        self.rows: dict[bytes, Row] = {}  # unchecked, made locations as they are used

    def locate(self, files: list[_File]) -> None:
        self.locations = self.store.locate_all(
            cid for f in files for _, cid, _ in f.wanted if cid != HOLE)
        self.store.prefetch(self.locations.values())

    def locate_later(self, files: list[_File]) -> None:
        """A forked build's: only the index rows are read here; each child checks those of
        its own files (building and checking 212,000 locations took a 2 GiB build 1.4 s
        before any child started)."""
        self.rows = self.store.rows_all(
            cid for f in files for _, cid, _ in f.wanted if cid != HOLE)

    def packs(self) -> set[int]:
        """The packs the build may read. Of unchecked rows, those naming a pack by a number
        (a number the index lacks fails as the pack is opened); a row naming it otherwise
        fails where it is checked."""
        return ({loc.pack for loc in self.locations.values()}
                | {r[2] for r in self.rows.values() if type(r[2]) is int})

    def contents(self, wanted: list[Want], located: list[Location]
                 ) -> Iterator[tuple[int, int, bytes | None]]:
        """(offset, length, data or None for a hole) in file order; adjacent records read in
        one go, READ_RUN bytes of pack at most (but a longer record). ``located``: the blocks'
        locations but the holes', in order, as :func:`check_file` found them."""
        found = iter(located)
        wants: list[Want] = []  # the run's blocks: the wanted tuples themselves, not copies
        run: list[tuple[ObjectId, Location]] = []
        read_run = self.store.read_run

        def flush() -> Iterator[tuple[int, int, bytes | None]]:
            for (off, _, n), data in zip(wants, read_run(run), strict=True):
                yield off, n, data
            wants.clear()
            run.clear()

        start = end = pack = 0
        header = RECORD.size
        for want in wanted:
            cid = want[1]
            if cid == HOLE:
                if run:
                    yield from flush()
                yield want[0], want[2], None
                continue
            loc = next(found)
            if run and (loc.pack != pack or loc.offset != end + header
                        or loc.offset + loc.stored_len - start > READ_RUN):
                yield from flush()
            if not run:
                start, pack = loc.offset, loc.pack
            end = loc.offset + loc.stored_len
            wants.append(want)
            run.append((cid, loc))
        if run:
            yield from flush()

    def write(self, fd: int, f: _File, blocks: Iterator[tuple[int, int, bytes | None]],
              direct: bool = False) -> int:
        """Write ``blocks`` (offset, length, data or None for a hole) into ``fd``, then size
        and attributes; returns the bytes written. ``direct``: ``fd`` is a new file opened
        with O_DIRECT (see :func:`_write_direct`)."""
        written = 0
        iov: list[bytes] = []
        iov_at = iov_end = 0

        def put(iov: list[bytes], at: int) -> None:
            (_write_direct if direct else _pwritev_all)(fd, iov, at)

        for off, n, data in blocks:
            if iov and off == iov_end and len(iov) >= RUN_PIECES and direct:
                # a run is cut where it is aligned and the rest carried into the next: one
                # that began unaligned (chunks of any length) would go through the page cache
                cut = iov_end // DIRECT_ALIGN * DIRECT_ALIGN
                if cut > iov_at:
                    carry = _split_tail(iov, iov_end - cut)
                    put(iov, iov_at)
                    iov, iov_at = carry, cut
            if iov and (off != iov_end or len(iov) >= RUN_PIECES):
                put(iov, iov_at)
                iov = []
            if data is None:  # a hole
                if f.in_place:
                    _punch_hole(fd, off, n)
                continue
            if not iov:
                iov_at = off
            iov.append(data)
            iov_end = off + n
            written += n
        if iov:
            put(iov, iov_at)
        t = f.entry
        os.ftruncate(fd, t.size)  # also cuts what a direct write padded its last block with
        if not self.policy.foreign:
            _chown_fd(fd, t.uid, t.gid)
        os.fchmod(fd, self.policy.mode(t.mode))
        os.utime(fd, ns=(t.mtime_ns, t.mtime_ns))
        if self.progress:
            self.progress(written)
        return written

    def read(self, f: _File) -> Iterator[tuple[int, int, bytes | None]]:
        assert f.located is not None  # every file is checked before it is written
        return self.contents(f.wanted, f.located)

    def read_apart(self, f: _File) -> list[tuple[int, int, bytes | None]]:
        """:meth:`read`, for a file patched in place: its blocks, read by READERS threads
        when there are many. They lie apart in the packs (a reset brings back pages of
        every age, one here, one there), so each read waits on the disk by itself."""
        assert f.located is not None
        if len(f.wanted) < 2 * SCATTERED_PIECE:
            return list(self.contents(f.wanted, f.located))
        pieces: list[tuple[list[Want], list[Location]]] = []
        at = 0  # located skips holes
        for lo in range(0, len(f.wanted), SCATTERED_PIECE):
            part = f.wanted[lo:lo + SCATTERED_PIECE]
            n = sum(1 for want in part if want[1] != HOLE)
            pieces.append((part, f.located[at:at + n]))
            at += n
        pool = _readers()
        got = [pool.submit(lambda piece: list(self.contents(*piece)), p) for p in pieces]
        wait(got)  # all of them, even when one fails: none reads on once the caller unwinds
        return [block for piece in got for block in piece.result()]

    def new_file(self, dir_fd: int, name: str, f: _File) -> tuple[int, os.stat_result]:
        direct = f.entry.size >= DIRECT_MIN
        try:
            fd = os.open(name, _NEW_FILE | (os.O_DIRECT if direct else 0), 0o600,
                         dir_fd=dir_fd)
        except OSError as e:  # a filesystem without direct I/O (tmpfs)
            if not direct or e.errno != errno.EINVAL:
                raise
            direct = False
            fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            n = self.write(fd, f, self.read(f), direct)
            return n, os.fstat(fd)
        finally:
            os.close(fd)


def _note(st: os.stat_result, t: Entry) -> CacheEntry:
    return CacheEntry.of(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                         t.ref if isinstance(t.ref, bytes) else None, bool(t.chunked))


class _Apply:
    """The structural steps on a folder, relative to descriptors."""

    def __init__(self, dirs: _Dirs, policy: Policy, result: RestoreResult) -> None:
        self.dirs, self.policy, self.result = dirs, policy, result

    def remove(self, fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)

    def mkdir(self, fd: int, name: str) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return
            os.unlink(name, dir_fd=fd)
            os.mkdir(name, 0o700, dir_fd=fd)

    def link(self, fd: int, name: str, t: Entry) -> None:
        self.remove(fd, name)  # whatever is there (the snapshot skips FIFOs and devices)
        assert isinstance(t.ref, str)
        os.symlink(t.ref, name, dir_fd=fd)
        self.link_attrs(fd, name, t)

    def link_attrs(self, fd: int, name: str, t: Entry) -> None:
        if not self.policy.foreign:
            _chown_at(fd, name, t.uid, t.gid)
        os.utime(name, ns=(t.mtime_ns, t.mtime_ns), dir_fd=fd, follow_symlinks=False)

    def file_attrs(self, fd: int, name: str, t: Entry, where: str) -> os.stat_result:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise Conflict(f"{where} is not a regular file any more (something changed it "
                           "during the restore)")
        if not self.policy.foreign:
            _chown_at(fd, name, t.uid, t.gid)
        os.chmod(name, self.policy.mode(t.mode), dir_fd=fd)  # lstat said: a regular file
        os.utime(name, ns=(t.mtime_ns, t.mtime_ns), dir_fd=fd, follow_symlinks=False)
        return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def dir_attrs(self, parts: Parts, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        fd = self.dirs.get(parts)
        if not self.policy.foreign:
            _chown_fd(fd, uid, gid)
        os.fchmod(fd, self.policy.mode(mode))
        os.utime(fd, ns=(mtime_ns, mtime_ns))


# New files this large are written with O_DIRECT: the page cache's fresh pages cost more
# than the disk here (bench/README: a restore spent half its time in pwritev; direct writes
# of the same data took half as long, and leave nothing to write back).
DIRECT_MIN = 1 << 20
RUN_PIECES = 1024  # pieces a write is given at most (IOV_MAX)
DIRECT_BUFFER = 4 << 20  # a thread's aligned buffer: a run of any length goes through it
_direct = threading.local()


def _direct_buffer() -> mmap.mmap:
    """This thread's page-aligned buffer for direct writes."""
    buf: mmap.mmap | None = getattr(_direct, "buf", None)
    if buf is None:
        buf = _direct.buf = private_buffer(DIRECT_BUFFER)
    return buf


def _write_direct(fd: int, iov: list[bytes], offset: int) -> None:
    """Write the run ``iov`` at ``offset`` into a new file opened with O_DIRECT, through an
    aligned buffer of DIRECT_BUFFER bytes a thread, a buffer-full at a time. The last block
    is padded with zeros to the alignment (the file is cut to its size afterwards, and a
    later run overwrites the padding it needs); a run that does not start aligned, or a
    filesystem that refuses, is written through the page cache."""
    if offset % DIRECT_ALIGN == 0:
        buf = _direct_buffer()
        pieces = [memoryview(b) for b in reversed(iov)]  # the next piece is the last one
        try:
            while pieces:
                pos = 0
                while pieces and pos < DIRECT_BUFFER:  # fill the buffer
                    piece = pieces[-1]
                    take = min(len(piece), DIRECT_BUFFER - pos)
                    if take == len(piece):
                        buf[pos:pos + take] = piece
                        pieces.pop()
                    else:
                        buf[pos:pos + take] = piece[:take]
                        pieces[-1] = piece[take:]
                    pos += take
                padded = -(-pos // DIRECT_ALIGN) * DIRECT_ALIGN
                buf[pos:padded] = bytes(padded - pos)
                with memoryview(buf)[:padded] as view:
                    done = 0
                    while done < padded:
                        try:
                            k = os.pwritev(fd, [view[done:]], offset + done)
                        except OSError as e:
                            if e.errno != errno.EINVAL:  # a refusal: the page cache will do
                                raise
                            break
                        if k <= 0 or k % DIRECT_ALIGN:
                            break
                        done += k
                    if done < padded:  # the rest of this buffer and of the run, buffered
                        cut = min(done, pos)
                        iov = [bytes(view[cut:pos]), *(bytes(p) for p in reversed(pieces))]
                        offset += cut
                        break
                offset += pos
            else:
                return
        finally:
            pieces.clear()
    set_direct(fd, False)  # from here on, through the page cache
    _pwritev_all(fd, iov, offset)


def _split_tail(iov: list[bytes], tail: int) -> list[bytes]:
    """Take the last ``tail`` bytes off ``iov`` (in place); returns them as pieces. A piece
    cut in two becomes two views of it (what the writers take, as bytes do)."""
    carry: list[bytes] = []
    while tail:
        piece = iov.pop()
        if len(piece) > tail:
            view = memoryview(piece)
            iov.append(cast(bytes, view[:len(piece) - tail]))
            piece = cast(bytes, view[len(piece) - tail:])
        carry.append(piece)
        tail -= len(piece)
    carry.reverse()
    return carry


def _pwritev_all(fd: int, iov: list[bytes], offset: int) -> None:
    done = os.pwritev(fd, iov, offset)
    want = sum(len(b) for b in iov)
    if done < want:  # a short write: finish the rest piece by piece
        rest = b"".join(iov)[done:]
        offset += done
        while rest:
            k = os.pwrite(fd, rest, offset)
            rest, offset = rest[k:], offset + k


def _chown_at(fd: int, name: str, uid: int, gid: int) -> None:
    try:
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
    except PermissionError:
        if _IS_ROOT:
            raise  # a non-root user keeps their own ids, as tar does


def _chown_fd(fd: int, uid: int, gid: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        if _IS_ROOT:
            raise


def _plan(top: Path, top_fd: int | None, store: PackStore, target: Root, current: Root | None,
          policy: Policy) -> _Planner:
    p = _Planner(top, top_fd, store, policy)
    if current is None or current.tree != target.tree:
        p.folder((), current.tree if current else None, target.tree, top_fd is not None)
    return p


def _replay(p: _Planner, dirs: _Dirs, act: _Apply, result: RestoreResult, top: Path,
            place: Callable[[int, _File], None]) -> None:
    """Run the planned steps in order; ``place`` puts a written or patched file."""
    for kind, parts, name, arg in p.steps:
        fd = dirs.get(parts)
        where = _where(top, parts, name)
        if kind == "rm":
            act.remove(fd, name)
            result.removed += 1
        elif kind == "mkdir":
            act.mkdir(fd, name)
        elif kind == "link":
            assert isinstance(arg, Entry)
            act.link(fd, name, arg)
        elif kind == "linkattrs":
            assert isinstance(arg, Entry)
            act.link_attrs(fd, name, arg)
        elif kind == "attrs":
            assert isinstance(arg, Entry)
            result.touched[_rel(parts, name)] = _note(act.file_attrs(fd, name, arg, where), arg)
        else:
            assert isinstance(arg, _File)
            place(fd, arg)
    for rel, is_dir in p.removed:
        result.removed_paths.add(rel)
        if is_dir:
            result.removed_dirs.append(rel + b"/")


def _top_attrs(act: _Apply, target: Root, p: _Planner) -> None:
    for parts, e in p.dir_attrs:
        act.dir_attrs(parts, e.mode, e.uid, e.gid, e.mtime_ns)
    act.dir_attrs((), target.mode, target.uid, target.gid, target.mtime_ns)


@no_cycle_gc()
def build(top: Path, store: PackStore, target: Root, policy: Policy = Policy(),
          progress: Progress | None = None) -> RestoreResult:
    """Write ``target`` into ``top``, a folder that must not exist yet (made here). A failure
    leaves a partial folder, which the caller throws away."""
    os.makedirs(top.parent, exist_ok=True)
    try:
        os.mkdir(top, 0o700)
    except FileExistsError:  # an empty folder made by a backend (a new subvolume) will do
        if any(os.scandir(top)):
            raise
    top_fd = open_top(top, False)
    result = RestoreResult()
    dirs = _Dirs(top, top_fd)
    try:
        p = _plan(top, None, store, target, None, policy)
        w = _Writer(store, policy, progress)
        groups: dict[Parts, list[_File]] = {}
        for f in p.files:  # each one is placed by a step of its own, in this order
            groups.setdefault(f.parts, []).append(f)
        batches = _batches(groups.values())
        forked = (sum(f.entry.size for f in p.files) >= FORK_MIN and len(batches) > 1
                  and sum(len(f.wanted) for f in p.files) <= FORK_MAX_OBJECTS)
        if forked:  # the children check what they write before writing it
            w.locate_later(p.files)
        else:
            w.locate(p.files)
            p.check_sizes(w)
        _expect(progress, p.files)
        act = _Apply(dirs, policy, result)
        _replay(p, dirs, act, result, top, lambda fd, f: None)
        dirs.close()
        dirs.fds = {(): top_fd}

        def one(group: list[_File]) -> list[tuple[_File, int, os.stat_result]]:
            """The files of one folder (a descriptor of their own: threads share nothing)."""
            if forked:  # all checked before any is written (then read ahead, if not direct)
                store.prefetch([loc for f in group for loc in check_file(f, w)])
            local = _Dirs(top, top_fd)
            try:
                fd = local.get(group[0].parts)
                return [(f, *w.new_file(fd, f.name, f)) for f in group]
            finally:
                local.close()

        for done in (_run_forked(one, batches, w) if forked else run_all(one, batches)):
            for f, n, st in done:
                result.bytes_written += n
                result.files_written += 1
                result.touched[f.rel] = _note(st, f.entry)
        _top_attrs(act, target, p)
    finally:
        dirs.close()
        os.close(top_fd)
    return result


def _run_forked(one: Callable[[list[_File]], list[tuple[_File, int, os.stat_result]]],
                batches: list[list[_File]], w: _Writer
                ) -> list[list[tuple[_File, int, os.stat_result]]]:
    """``one`` over ``batches`` in WORKERS child processes (:mod:`forked`), each handed the
    next batch as it finishes one: a child slowed by its files (the kernel's inode
    allocation can cost seconds in a folder whose neighbours were just deleted) leaves the
    rest to the others. The children read packs through descriptors opened here, write
    files and report each file's stat; the tree's order is close to the packs'."""
    w.store.open_packs(w.packs())
    results: list[list[tuple[_File, int, os.stat_result]]] = []
    progress = w.progress

    def setup(link: forked.Link) -> None:
        if w.progress:
            w.progress = link.progress

    def written(i: int) -> list[tuple[int, int, os.stat_result]]:
        return [(j, n, st) for j, (_, n, st) in enumerate(one(batches[i]))]

    def done(i: int, got: list[tuple[int, int, os.stat_result]]) -> None:
        results.append([(batches[i][j], n, st) for j, n, st in got])

    if not forked.run(range(len(batches)), written, done, workers=WORKERS,
                      what="writing files", progress=progress, setup=setup):
        return run_all(one, batches)
    return results  # (forked.run raises unless every batch was done)


def _batches(groups: Iterable[list[_File]], files: int = 64,
             size: int = 8 << 20) -> list[list[_File]]:
    """Work for the pool: a folder's files in batches of at most ``files`` files or ``size``
    bytes (many small files share a descriptor, big ones are written side by side), in
    the tree's order, which is close to the packs' (measured: biggest first is slower)."""
    out: list[list[_File]] = []
    for group in groups:
        batch: list[_File] = []
        total = 0
        for f in group:
            if batch and (len(batch) >= files or total + f.entry.size > size):
                out.append(batch)
                batch, total = [], 0
            batch.append(f)
            total += f.entry.size
        if batch:
            out.append(batch)
    return out


class Prepared:
    """A restore of a folder in use whose data is verified and staged; :meth:`apply` puts it in
    place, :meth:`abort` throws the staging away (the folder was never touched)."""

    def __init__(self, top: Path, store: PackStore, target: Root, p: _Planner, w: _Writer,
                 staging: Path, policy: Policy, seen: StatCache) -> None:
        self.top, self.store, self.target, self.p, self.w = top, store, target, p, w
        self.staging, self.policy, self.seen = staging, policy, seen

    def apply(self) -> RestoreResult:
        result = RestoreResult()
        top_fd = open_top(self.top, True)
        staging_fd = os.open(self.staging, _DIR_FLAGS)
        dirs = _Dirs(self.top, top_fd)
        act = _Apply(dirs, self.policy, result)
        patches: list[tuple[_File, int]] = []

        def place(fd: int, f: _File) -> None:
            if f.in_place:
                patches.append((f, os.dup(fd)))
                return
            try:  # rename replaces whatever non-folder is there: FIFO, device, link
                os.rename(f.staged, f.name, src_dir_fd=staging_fd, dst_dir_fd=fd)
            except IsADirectoryError:  # a folder appeared where the file goes
                act.remove(fd, f.name)
                os.rename(f.staged, f.name, src_dir_fd=staging_fd, dst_dir_fd=fd)
            st = os.stat(f.name, dir_fd=fd, follow_symlinks=False)
            result.touched[f.rel] = _note(st, f.entry)
            result.files_written += 1
            result.bytes_written += f.entry.size

        try:
            _replay(self.p, dirs, act, result, self.top, place)
            for n, st, f in run_all(lambda job: self._patch(*job), patches):
                result.touched[f.rel] = _note(st, f.entry)
                result.files_written += 1
                result.bytes_written += n
            # Before the top's times are set: the staging may be inside it (a snapshot
            # backend patches a private writable snapshot, and stages in it).
            shutil.rmtree(self.staging, ignore_errors=True)
            _top_attrs(act, self.target, self.p)
        finally:
            for _, fd in patches:
                os.close(fd)
            dirs.close()
            os.close(top_fd)
            os.close(staging_fd)
        self.abort()
        return result

    def _patch(self, f: _File, dir_fd: int) -> tuple[int, os.stat_result, _File]:
        where = _where(self.top, f.parts, f.name)
        fd = os.open(f.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            was = self.seen.get(f.rel)
            if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or was is None
                    or (was[0], was[1], was[2], was[3]) != (st.st_size, st.st_mtime_ns,
                                                            st.st_ctime_ns, st.st_ino)):
                raise Conflict(f"{where} changed during the reset (something writes to the "
                               "dot unseen): stop it, then run the command again to finish")
            blocks = iter(f.blocks) if f.blocks is not None else self.w.read(f)
            n = self.w.write(fd, f, blocks)
            return n, os.fstat(fd), f
        finally:
            os.close(fd)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@no_cycle_gc()
def prepare(top: Path, store: PackStore, target: Root, current: Root | None, staging: Path,
            policy: Policy = Policy(), progress: Progress | None = None,
            seen: StatCache | None = None) -> Prepared:
    """Plan making ``top`` hold ``target`` (``current``: what it holds now, None if it does not
    exist), and stage and verify everything it needs in ``staging`` (a new folder on the
    same filesystem); the folder itself is not touched. ``seen``: the stat of each file when
    ``current`` was taken; a file patched in place must still have it (a write since would
    be mixed into the patch, unseen)."""
    top_fd = open_top(top, False) if current is not None and os.path.isdir(top) else None
    try:
        p = _plan(top, top_fd, store, target, current, policy)
    finally:
        if top_fd is not None:
            os.close(top_fd)
    w = _Writer(store, policy, progress)
    w.locate(p.files)
    _expect(progress, p.files)
    p.check_sizes(w)
    os.makedirs(staging.parent, exist_ok=True)
    os.mkdir(staging, 0o700)
    prepared = Prepared(top, store, target, p, w, staging, policy, seen or {})
    staging_fd = os.open(staging, _DIR_FLAGS)
    budget = [PATCH_MEMORY]
    lock = threading.Lock()

    def stage(item: tuple[int, _File]) -> int:
        i, f = item
        if not f.in_place:
            f.staged = str(i)
            n, _ = w.new_file(staging_fd, f.staged, f)
            return n
        blocks = w.read_apart(f)  # verified as read
        size = sum(n for _, n, d in blocks if d is not None)
        with lock:
            budget[0] -= size
            keep = budget[0] >= 0
        f.blocks = blocks if keep else None  # over the budget: read again in apply
        return size

    try:
        run_all(stage, enumerate(p.files))
    except BaseException:
        prepared.abort()
        raise
    finally:
        os.close(staging_fd)
    return prepared


def merge_cache(old: StatCache, result: RestoreResult) -> StatCache:
    """The stat cache after a restore: old entries minus removed paths, plus written files.
    Folders' entries go: their trees are made again by the next commit."""
    gone, dirs = result.removed_paths, tuple(result.removed_dirs)
    new = {k: v for k, v in old.items() if k not in gone and not (dirs and k.startswith(dirs))
           and not v[5] & FOLDER}
    new.update(result.touched)
    return new


__all__ = ["Policy", "Prepared", "RestoreResult", "build", "merge_cache", "prepare"]
