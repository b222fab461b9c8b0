"""Snapshot a folder into the store, reading only files whose stat changed since the last time.

The stat cache maps a relative path to (size, mtime_ns, ctime_ns, inode) and the content id that
those bytes had; an unchanged file costs one ``lstat``. Entries written less than RACY_NS before
the scan began are not trusted next time, since a write in the same clock tick would not show.
Each worker thread reuses one read buffer: first-touching fresh memory is slow on these VMs.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar, cast

from dotmesh.errors import InternalError
from dotmesh.fs import btrfs, scan
from dotmesh.fs.reflink import Stats
from dotmesh.fs.scan import Entry
from dotmesh.heap import private_buffer
from dotmesh.meta.db import load_fingerprints, save_fingerprints
from dotmesh.meta.statcache import (
    CHUNKED,
    FOLDER,
    HAS_CONTENT,
    HINT_ONLY,
    NO_CONTENT,
    CacheEntry,
    StatCache,
    folder_key,
)
from dotmesh.model.ids import HOLE, ObjectId, object_id
from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_FILELIST,
    KIND_TREE,
    MAGIC_TREE,
    SYMLINK,
    FileList,
    Root,
    Tree,
    chunk_ids,
    encode_filelist,
    encode_tree_rows,
    filelist_chunks,
    filelist_entries,
    filelist_of_entries,
    paged_blocks,
)
from dotmesh.store import chunker
from dotmesh.store.packs import PackFiller, PackStore, PackWriter, Span, compress, compress_many
from dotmesh.workdir import forked

_HEX = re.compile(r"[0-9a-f]{64}")  # a folder's id in a tree row
WARM_TREE_ROWS = 10_000  # rows of a reference's trees read while its snapshot is taken (12-20 ms)
DEFER_LIMIT = 256 << 20  # at most this much raw data waits in memory for compression
RACY_NS = 100_000_000  # well above the timestamp tick of Linux filesystems (at most 10 ms)
WORKERS = 2
AHEAD = 4  # folders a walk lists ahead of the one it compares with the cache
NOT_REUSED = 1 << 62  # a "newest ctime" no folder entry's limit passes
SMALL_BATCH = 4 << 20
MEDIUM_FILE = 1 << 20  # files cut by CDC up to this size are read in batches ...
MEDIUM_BATCH = 8 << 20  # ... of this many bytes (and as many files as fit a read buffer)
FORK_MIN = 64 << 20  # bytes to read from which a commit's reads go to child processes ...
# ... up to this many files, and this many chunk ids of their previous versions: each child
# ends up with its own copy of most pages holding them (about 0.75 KB a file)
FORK_MAX_FILES = 100_000
FORK_MAX_PREVIOUS = 1 << 20
# A paged file whose changed blocks (by the reference's extent maps) come to at most this is
# patched by one job; more, and it is read segment by segment on every core.
PATCH_LIMIT = 2 * chunker.SEGMENT


Progress = Callable[[int], None]
# A paged file's change against a reference: its file list there, that list's fingerprints,
# the runs of blocks to read, and the extents of the file read (Reference.changes)
_Changes = tuple[bytes, bytes | None, list[tuple[int, int]], "list[btrfs.Extent]"]


Row = list[object]  # a tree row, shaped like Entry.to_json
# What a following pass of a live commit knows of the files this one read (their chunks,
# as _previous gives them), made only if a pass asks: most commits have none (no writer ran)
Recent = dict[bytes, Callable[[], tuple[frozenset[bytes], chunker.Previous | None]]]
Watch = Callable[[str], None]  # told a folder's relative path just before it is listed


@dataclass
class SnapshotResult:
    root: Root
    cache: StatCache
    files_read: int = 0
    bytes_read: int = 0
    total_size: int = 0
    unstored_trees: dict[bytes, bytes] = field(default_factory=dict)
    deferred: list[chunker.Record] = field(default_factory=list)  # see store_deferred
    # Every folder's complete tree rows by relative path ("" is the top), so that a later
    # :func:`update` re-reads only the names it is told changed.
    folders: dict[str, list[Row]] = field(default_factory=dict)
    # Files with more than one hard link: a write through a name outside the watched folders
    # sends no event there, so :func:`update` callers look at these every time.
    linked: set[str] = field(default_factory=set)
    pending: Callable[[], None] | None = None  # what a deferred snapshot still has to do
    frozen_bytes_read: int = 0  # read by a deferred snapshot (in a freeze)
    # The chunks of the files read, for the next pass of a live commit (no decoding again).
    recent: Recent = field(default_factory=dict)
    # The names whose stat was looked at: every one of a folder walked whole, only the
    # changed ones of an update (how much the scan cost, whatever the folder holds)
    looked_at: int = 0

    def finish(self) -> None:
        """Store what a snapshot taken in a freeze left for after the thaw (sets ``root``)."""
        if self.pending is not None:
            self.pending()
            self.pending = None


# A paged file as the reference holds it: its encoded file list there, that list's
# fingerprints, the extents of its copy in the reference's folder and that copy's size
_Base = tuple[bytes, bytes | None, list[btrfs.Extent], int]
# What reading a changed paged file ahead gave (Reference.read_ahead): its comparison, and
# if it was patched, the result, the content id of its list and the stat of the file read
_Read = tuple["_Changes | None", "tuple[chunker.Patched, ObjectId, os.stat_result] | None"]
WARM_MIN = 1 << 20  # paged files from this size get their reference's side read ahead ...
WARM_COUNT = 16  # ... up to this many (the largest), each holding its file list meanwhile


@dataclass(frozen=True)
class Reference:
    """A read-only snapshot of this folder as a commit holds it (``tree``: that commit's tree
    of it). A paged file that changed since has its blocks compared by their disk addresses
    with the same file there: the blocks both still share are not read again.

    What a comparison needs from the reference alone (the file's list, its fingerprints, its
    extents) can be read ahead, while the commit's own snapshot is being taken
    (:meth:`warm`); and the files themselves compared and read as soon as it exists, beside
    the walk (:meth:`read_ahead`)."""

    folder: Path
    tree: ObjectId
    # The working folder that the snapshot being read was taken of, when the snapshot's files
    # are the same inodes (btrfs): changed pages are read there if its extents prove them
    # unchanged since (:func:`_patch_live`)
    live: Path | None = None
    _bases: dict[bytes, Future[_Base | None]] = field(default_factory=dict, compare=False,
                                                      repr=False)
    _ahead: dict[tuple[bytes, str], Future[_Read]] = field(default_factory=dict,
                                                           compare=False, repr=False)
    # what warm_trees read so far, the job reading them, and the word to stop
    _trees: dict[ObjectId, list[Row]] = field(default_factory=dict, compare=False, repr=False)
    _tree_job: list[Future[None]] = field(default_factory=list, compare=False, repr=False)
    _tree_stop: threading.Event = field(default_factory=threading.Event, compare=False,
                                        repr=False)

    def content(self, store: PackStore, rel: bytes) -> ObjectId | None:
        """The content id the file at ``rel`` has in the reference (None: no such file)."""
        tree = self.tree
        *dirs, name = os.fsdecode(rel).split("/")
        try:
            for part in dirs:
                found = [e for e in Tree.decode(store.get(tree)).entries
                         if e.name == part and e.kind == DIR]
                if not found or not isinstance(found[0].ref, bytes):
                    return None
                tree = found[0].ref
            files = [e for e in Tree.decode(store.get(tree)).entries
                     if e.name == name and e.kind == FILE and e.chunked]
        except Exception:  # a damaged tree only costs reads
            return None
        ref = files[0].ref if files else None
        return ref if isinstance(ref, bytes) else None

    def _extents(self, path: str) -> tuple[list[btrfs.Extent], int] | None:
        """The extent map and size of the file at ``path`` (None if it cannot be read: a
        missing reference only costs reads)."""
        try:
            fd = _open_file(path)
        except OSError:
            return None
        try:
            return btrfs.file_extents(fd), os.fstat(fd).st_size
        except OSError:
            return None
        finally:
            os.close(fd)

    def _maps(self, rel: bytes, path: str
              ) -> tuple[list[btrfs.Extent], list[btrfs.Extent], int, int] | None:
        """The extent maps and sizes of the file at ``rel`` here and of the file at ``path``."""
        old = self._extents(os.path.join(self.folder, os.fsdecode(rel)))
        new = None if old is None else self._extents(path)
        return None if old is None or new is None else (old[0], new[0], old[1], new[1])

    def base(self, store: PackStore, rel: bytes) -> _Base | None:
        """The reference's side of a paged file's comparison (None: no such paged file)."""
        content = self.content(store, rel)
        if content is None:
            return None
        try:
            base = store.get(content)
        except Exception:  # a damaged or missing reference only costs reads
            return None
        old = self._extents(os.path.join(self.folder, os.fsdecode(rel)))
        if old is None:
            return None
        extents, size = old
        if paged_blocks(base, chunker.PAGE_BLOCK) != size // chunker.PAGE_BLOCK \
                or size % chunker.PAGE_BLOCK:
            return None
        return base, load_fingerprints(store.conn, content), extents, size

    def changes(self, store: PackStore, rel: bytes, path: str) -> _Changes | None:
        """For a paged file: the reference's encoded file list of it, that list's
        fingerprints, and the runs of blocks the extent maps do not show as shared (what a
        commit must read); None if the reference has no such paged file."""
        ahead = self._bases.get(rel)
        got = ahead.result() if ahead is not None else self.base(store, rel)
        if got is None:
            return None
        base, fps, old, old_size = got
        mine = self._extents(path)
        if mine is None:
            return None
        new, size = mine
        common = min(old_size, size)
        changed = btrfs.changed_ranges(old, new, common)
        if size > common:  # what the file grew by is new
            changed.append((common, size))
        runs = btrfs.blocks_touching(changed, chunker.PAGE_BLOCK,
                                     -(-size // chunker.PAGE_BLOCK))
        return base, fps, runs, new

    def warm(self, store: PackStore, rels: Iterable[bytes]) -> None:
        """Read the reference's side of these files' comparisons on the I/O pool, ahead."""
        pool = shared_pool()
        for rel in rels:
            if rel not in self._bases:
                self._bases[rel] = pool.submit(self.base, store, rel)

    def warm_trees(self, store: PackStore, limit: int = WARM_TREE_ROWS) -> None:
        """Read the reference's top tree and the folders' under it, a level at a time, on
        the I/O pool while the commit's snapshot is taken, until ``limit`` rows are read
        or :meth:`trees_read` asks for them: a commit then reads those of the folders
        holding changes (:func:`since_reference`), and the 5,000 rows of the bench's
        uploads took 6-12 ms alone, 40-60 ms beside the readers."""
        got, stop = self._trees, self._tree_stop

        def read() -> None:
            level, count = [self.tree], 0
            while level:
                below: list[ObjectId] = []
                for oid in level:
                    if stop.is_set() or count >= limit:
                        return
                    if oid in got:  # folders alike (empty ones) share their tree
                        continue
                    rows = _tree_rows(store, oid)
                    if rows is None:
                        continue
                    got[oid] = rows
                    count += len(rows)
                    below += [ObjectId(bytes.fromhex(cast(str, r[7]))) for r in rows
                              if r[1] == DIR]
                level = list(dict.fromkeys(below))

        if not self._tree_job:
            self._tree_job.append(shared_pool().submit(read))

    def trees_read(self) -> dict[ObjectId, list[Row]]:
        """What :meth:`warm_trees` has read by now; it reads no more (the caller reads
        the rest it needs itself rather than wait)."""
        self._tree_stop.set()
        return dict(self._trees)

    def read_ahead(self, store: PackStore, writer: PackWriter | None, top: Path) -> None:
        """Compare the files :meth:`warm` was given with their copies under ``top`` (a
        read-only snapshot: what the walk will find there) and, with a ``writer``, read and
        store what changed in them, on the I/O pool, beside the walk. A file the walk then
        finds unchanged (it was changed back before the snapshot) leaves blocks that nothing
        names, which gc takes."""
        pool = shared_pool()
        for rel in self._bases:
            path = os.path.join(top, os.fsdecode(rel))
            if (rel, path) not in self._ahead:
                self._ahead[rel, path] = pool.submit(self._read_one, store, writer, rel, path)

    def _read_one(self, store: PackStore, writer: PackWriter | None, rel: bytes, path: str
                  ) -> _Read:
        changes = self.changes(store, rel, path)
        if changes is None or writer is None or not _patchable(changes):
            return changes, None
        try:
            st = os.lstat(path)
        except OSError:
            return changes, None
        sink = _Sink(store, writer)
        try:
            got = _patch(self, sink, rel, path, st, changes)
        except FileNotFoundError:  # vanished since the scan: the walk will say so
            return changes, None
        if got is None:
            return changes, None
        return changes, (got, sink.put(KIND_FILELIST, got.filelist), st)

    def comparing(self, store: PackStore, rel: bytes, path: str) -> Future[_Read]:
        """The comparison of the file at ``path``, and its read if that was done ahead
        (started ahead, or now)."""
        got = self._ahead.pop((rel, path), None)
        return got if got is not None else shared_pool().submit(
            lambda: (self.changes(store, rel, path), None))

    def _started(self) -> list[Future[Any]]:
        return [*self._bases.values(), *self._ahead.values(), *self._tree_job]

    def wait(self) -> None:
        """Wait until what was started ahead has ended (its results are kept); the trees
        read ahead stop where they are (a freeze waits for this)."""
        self._tree_stop.set()
        wait(self._started())

    def settle(self) -> None:
        """Wait for whatever was started ahead (nothing may go on reading the store once a
        command unwinds) and let it go."""
        self._tree_stop.set()
        started = self._started()
        for fut in started:
            fut.cancel()
        wait(started)
        self._bases.clear()
        self._ahead.clear()
        self._tree_job.clear()
        self._trees.clear()

    def blocks(self, store: PackStore, rel: bytes, path: str
               ) -> tuple[chunker.Previous, frozenset[int]] | None:
        """The reference's version of a paged file and the blocks that, by the extent maps,
        still hold the same bytes in the file at ``path``."""
        content = self.content(store, rel)
        if content is None:
            return None
        try:
            ids, paged = _page_ids(store.get(content))
        except Exception:
            return None
        if not paged:
            return None
        # Fingerprints are kept for about one version of a file: a state reset to may have
        # none left. Its block ids are all that skipping needs; unknown ones never match.
        supers = (len(ids) * chunker.PAGE_BLOCK + chunker.SUPER - 1) // chunker.SUPER
        fps = load_fingerprints(store.conn, content) or chunker.UNKNOWN_FP * supers
        maps = self._maps(rel, path)
        if maps is None:
            return None
        old, new, old_size, size = maps
        ranges = btrfs.shared_ranges(old, new, min(old_size, size))
        same = frozenset(btrfs.unchanged_blocks(ranges, chunker.PAGE_BLOCK))
        return chunker.Previous(ids, fps), same


@dataclass(frozen=True)
class _Entries:
    """A part of a file's list as the list encodes it (``objects.filelist_entries``), with
    how many chunks and bytes it holds: what a reading child sends back for a segment,
    instead of a tuple per chunk to pickle there and unpickle here (a segment of a paged
    file holds 32,768: 4-7 ms to pickle, 6-9 ms to unpickle, then encoded again here)."""

    data: bytes
    count: int
    size: int

    @classmethod
    def of(cls, chunks: list[tuple[ObjectId, int]]) -> _Entries:
        return cls(filelist_entries(chunks), len(chunks), sum(map(itemgetter(1), chunks)))


Part = list[tuple[ObjectId, int]] | _Entries


@dataclass
class _File:
    """A file that has to be read; ``row`` is its tree row, completed once it has been read."""

    rel: bytes
    path: str
    st: scan.Lstat
    row: list[object]
    content: bytes | None = None
    chunked: bool = False
    size: int = 0
    parts: list[Part] = field(default_factory=list)  # _Entries: sent back by a child
    fingerprints: list[bytes] = field(default_factory=list)  # per segment, paged files only
    patched: chunker.Patched | None = None  # made from the reference's list (one job)


class _Sink:
    """Where workers send chunks: the pack writer, or nowhere when only hashing.

    With ``defer``, new chunks are only copied (up to DEFER_LIMIT bytes) and compressed and
    written later by :func:`store_deferred`: inside a freeze, the writers wait only for reads.
    """

    def __init__(self, store: PackStore, writer: PackWriter | None, defer: bool = False) -> None:
        self.store, self.writer = store, writer
        self.trees: dict[bytes, bytes] = {}  # what was not stored, for callers that diff
        self.deferred: list[chunker.Record] = []
        self.deferred_bytes = 0
        self.defer = defer and writer is not None
        self._lock = threading.Lock()
        # In a worker process (_read_forked): the parent decides what is new, and new
        # chunks go to packs it lends
        self.parent: forked.Link | None = None
        self.filler: PackFiller | None = None
        self.granted: set[ObjectId] = set()  # what the parent said this process stores

    def pack(self, buf: memoryview, spans: Sequence[Span]
             ) -> list[tuple[bytes | memoryview, bool]]:
        if self.defer and self.deferred_bytes < DEFER_LIMIT:
            return [(bytes(buf[o:o + n]), False) for o, n in spans]
        return compress_many(buf, spans)

    def missing(self, oids: list[ObjectId]) -> set[ObjectId]:
        if self.writer is None:
            return set()
        if self.parent is not None:  # the parent decides (and tells no other child so)
            unknown = set(oids) - self.granted
            if not unknown:
                return set()
            need = cast(set[ObjectId], self.parent.ask("missing", unknown))
            self.granted |= need
            return need
        fresh = [o for o in oids if o not in self.writer]
        return self.store.missing(fresh) if fresh else set()

    def take(self, chunks: chunker.Chunks) -> list[tuple[ObjectId, int]]:
        if chunks.new and self.writer is not None:
            now = [r for r in chunks.new if r[4] or not self.defer]
            later = [r for r in chunks.new if not r[4] and self.defer]
            if later:
                with self._lock:
                    self.deferred.extend(later)
                    self.deferred_bytes += sum(r[2] for r in later)
            if now and self.filler is not None:
                self.filler.add_many(now)
            elif now:
                self.writer.add_many(now)
        return list(zip(chunks.ids, chunks.lengths, strict=True))

    def put(self, kind: int, data: bytes) -> ObjectId:
        if self.writer is None:
            oid = object_id(data)
            if kind == KIND_TREE:
                self.trees[oid] = data
            return oid
        return self.writer.put(kind, data)


_tls = threading.local()
_pool: ThreadPoolExecutor | None = None


_walk_lister: ThreadPoolExecutor | None = None


def _lister() -> ThreadPoolExecutor:
    """The thread that lists folders for walks (one per process, started on first use: a
    walk inside a freeze must not pay for starting one)."""
    global _walk_lister
    if _walk_lister is None:
        _walk_lister = ThreadPoolExecutor(1, thread_name_prefix="dm-walk")
    return _walk_lister


def shared_pool() -> ThreadPoolExecutor:
    """One pool of WORKERS threads per process: starting threads inside a freeze costs time."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="dm-io")
    return _pool


def drain_pool() -> None:
    """Cancel what the I/O pool has queued and wait for what it runs: an interrupted command
    must not remove a folder that its threads still write into (the next use starts anew)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _forget_pools() -> None:
    """In a forked child (the daemon's commands) the pools' threads do not exist: start anew."""
    global _pool, _walk_lister
    _pool = _walk_lister = None


os.register_at_fork(after_in_child=_forget_pools)

T = TypeVar("T")
R = TypeVar("R")


def run_all(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` on the shared pool, results in order; waits for every one before
    raising the first failure, so no worker still uses a descriptor the caller then closes."""
    futures = [shared_pool().submit(fn, x) for x in items]
    try:
        wait(futures)
    except BaseException:  # Ctrl-C: nothing more starts, and what runs is waited for
        for f in futures:
            f.cancel()
        wait(futures)
        raise
    return [f.result() for f in futures]


def store_deferred(writer: PackWriter, records: list[chunker.Record]) -> None:
    """Compress and write chunks whose compression a freeze put off, on both cores."""
    def pack(batch: list[chunker.Record]) -> None:
        writer.add_many([(k, oid, n, *compress(raw)) for k, oid, n, raw, _ in batch])

    batches = [records[i:i + 256] for i in range(0, len(records), 256)]
    for _ in shared_pool().map(pack, batches):
        pass


def _buffer() -> mmap.mmap:
    """This thread's read buffer (see chunker.Buffer)."""
    buf: mmap.mmap | None = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = private_buffer(chunker.SEGMENT)
    return buf


def _page_ids(data: bytes) -> tuple[list[ObjectId], bool]:
    """The chunk ids of an encoded file list, and whether its blocks are a paged file's
    (:func:`chunker.page_lengths`). A list of page blocks only has its ids read out, not
    decoded: 35 ms less for a 532 MiB file. Corrupt if the list is malformed."""
    if paged_blocks(data, chunker.PAGE_BLOCK) is not None:
        return cast(list[ObjectId], list(chunk_ids(data))), True
    chunks = FileList.decode(data).chunks
    return list(map(itemgetter(0), chunks)), chunker.page_lengths(
        list(map(itemgetter(1), chunks)))


def _previous(store: PackStore, old: tuple[int, int, int, int, bytes, int] | None
              ) -> tuple[frozenset[bytes], chunker.Previous | None]:
    """What a file's previous version (its stat cache entry ``old``) spares a commit: chunk
    ids known to be in the store (never looked up), and, for a paged file with fingerprints,
    its block ids by position. Those are not also put in the set (a set of a 532 MiB file's
    68,000 ids took 10-17 ms): :func:`chunk_paged` knows them by position, and
    :func:`_as_known` makes the set where the file is no longer paged."""
    if old is None or not old[5] & HAS_CONTENT:
        return frozenset(), None
    if not old[5] & CHUNKED:
        return frozenset((old[4],)), None
    try:
        ids, paged = _page_ids(store.get(ObjectId(old[4])))  # 32 bytes, as cached
    except Exception:  # a damaged cache only costs a lookup; fsck reports the damage
        return frozenset(), None
    fps = load_fingerprints(store.conn, old[4])
    if fps and paged:
        return frozenset(), chunker.Previous(ids, fps)
    return frozenset(ids), None


def _as_known(got: tuple[frozenset[bytes], chunker.Previous | None], size: int
              ) -> tuple[frozenset[bytes], chunker.Previous | None]:
    """``got`` (see :func:`_previous`) for a file of ``size`` bytes now: one that is no
    longer paged is not cut by :func:`chunker.chunk_paged`, so its previous blocks go into
    the set of known ids."""
    known, prev = got
    if prev is not None and not known and not chunker.is_paged(size):
        return frozenset(prev.ids), prev
    return got



class _Walk:
    """Lists folders into tree rows; files whose stat matches the cache keep their content id,
    the others are queued in ``reads``. This loop is the whole cost of a no-change commit."""

    def __init__(self, top: str, cache: StatCache, watch: Watch | None,
                 stats: Stats | None = None) -> None:
        self.top, self.cache, self.watch = top, cache, watch
        self.stats = stats  # a copy's files judged by their originals' stats (see snapshot)
        self.folders: dict[str, list[Row]] = {}
        self.hits: StatCache = {}
        self.reads: list[_File] = []
        self.linked: list[tuple[str, int]] = []  # (path, inode) of files with several links
        self.total = 0
        self.looked_at = 0  # names whose stat was compared
        # Folders listed whole -> their (ctime, inode) as their own listing saw them (before
        # reading their entries); their rows in their parents take its mode, owner and mtime.
        self.dirs: dict[str, tuple[int, int]] = {}
        self._dir_rows: dict[str, Row] = {}  # folder -> its row in its parent's rows
        # Folders listed whole with no file to read, no empty file its entry does not match
        # and no symlink -> the newest ctime of their entries: those whose cached tree may
        # still be theirs (see _reusable).
        self.newest: dict[str, int] = {}
        self._newest = 0  # of the entries rows() was last given

    def tree(self, rel: str, until_a_read: bool = False) -> list[str]:
        """Add the folder ``rel`` and everything beneath it; returns the folders listed.
        ``until_a_read``: stop after the first folder with a file to read (the walk is then
        incomplete: only its ``reads`` being non-empty means anything).

        Folders are listed AHEAD at a time on a thread (the listing holds no GIL) while this
        one compares the last listed with the cache; they are taken in the order listed."""
        listed: list[str] = []
        todo = deque([rel])
        ahead: deque[tuple[str, Future[tuple[Entry | None, list[Entry]]]]] = deque()
        lister = _lister()
        try:
            while todo or ahead:
                while todo and len(ahead) < AHEAD:
                    sub = todo.popleft()
                    if self.watch is not None:
                        self.watch(sub)  # before listing: a later change sends an event
                    ahead.append((sub, lister.submit(
                        scan.listing, os.path.join(self.top, sub), bool(sub))))
                if until_a_read and self.reads:
                    break
                sub, listing = ahead.popleft()
                listed.append(sub)
                rows: list[Row] = []
                self.folders[sub] = rows
                reads = len(self.reads)
                own, entries = listing.result()
                todo.extend(self.rows(sub, entries, rows))
                if own is None:  # gone since its parent was listed: listed empty
                    continue
                self.dirs[sub] = (own[8], own[2])
                row = self._dir_rows.get(sub)
                if row is not None:  # the folder as it is now, not as its parent saw it
                    row[2], row[3], row[4], row[5] = own[1] & 0o7777, own[4], own[5], own[7]
                if len(self.reads) == reads:
                    self.newest[sub] = self._newest
        finally:
            for _, listing in ahead:
                listing.cancel()
        return listed

    def rows(self, rel: str, entries: list[Entry], rows: list[Row]) -> list[str]:
        """Append the rows of ``entries`` (in folder ``rel``); returns the sub-folders met."""
        prefix = rel + "/" if rel else ""
        cache, hits, fsencode = self.cache, self.hits, os.fsencode
        is_reg, is_dir, is_lnk = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
        subdirs: list[str] = []
        stats = self.stats
        newest = 0
        self.looked_at += len(entries)
        if stats is None:  # the files the cache vouches for, in C; the others below
            entries, size, newest = scan.match(fsencode(prefix), entries, cache, hits, rows,
                                               FILE, HINT_ONLY, HAS_CONTENT, CHUNKED)
            self.total += size
        for e in entries:
            name, mode, ino, nlink, uid, gid, size, mtime, ctime = e
            if is_reg(mode):
                key = fsencode(prefix + name)
                if stats is not None and key in stats:
                    e = scan.entry(name, stats[key])
                    name, mode, ino, nlink, uid, gid, size, mtime, ctime = e
                if ctime > newest:
                    newest = ctime
                self.total += size
                if nlink > 1:
                    self.linked.append((prefix + name, ino))
                old = cache.get(key)
                if (old is not None and not old[5] & HINT_ONLY and old[0] == size
                        and old[1] == mtime and old[2] == ctime and old[3] == ino):
                    hits[key] = old
                    flags = old[5]
                    rows.append([name, FILE, mode & 0o7777, uid, gid, mtime, size,
                                 old[4].hex() if flags & HAS_CONTENT else None,
                                 flags & CHUNKED])
                    continue
                row: Row = [name, FILE, mode & 0o7777, uid, gid, mtime, 0, None, 0]
                rows.append(row)
                if size:
                    self.reads.append(_File(key, os.path.join(self.top, prefix + name),
                                            scan.Lstat._make(e), row))
                else:  # nothing to read; cached all the same, for its inode (see update)
                    hits[key] = (0, mtime, ctime, ino, NO_CONTENT, 0)
                    newest = NOT_REUSED  # not what its entry says: its folder's tree is made
            elif is_dir(mode):
                row = [name, DIR, mode & 0o7777, uid, gid, mtime, 0, None, 0]
                rows.append(row)
                subdirs.append(prefix + name)
                self._dir_rows[prefix + name] = row
                if ctime > newest:
                    newest = ctime
            elif is_lnk(mode):
                try:
                    target = os.readlink(os.path.join(self.top, prefix + name))
                except OSError:
                    continue  # removed (or replaced by another kind) since it was listed
                rows.append([name, SYMLINK, mode & 0o7777, uid, gid, mtime, 0, target, 0])
                newest = NOT_REUSED  # a symlink has no entry to check it by: its folder's tree
                # is made each time (a tree cached later must not pass for an older copy's)
            # sockets, FIFOs and devices are not stored
        self._newest = min(newest, NOT_REUSED)  # whatever order the entries came in
        return subdirs


def snapshot(top: Path, store: PackStore, writer: PackWriter | None, cache: StatCache,
             progress: Progress | None = None, defer: bool = False,
             watch: Watch | None = None, reference: Reference | None = None,
             taken_ns: int | None = None, stats: Stats | None = None) -> SnapshotResult:
    """Store (or, with ``writer=None``, only hash) the folder ``top``; returns its root.

    One pass over the folders builds each tree's rows directly; files that missed the stat
    cache are read afterwards. ``watch`` is told each folder before it is listed.
    ``taken_ns``: ``top`` is a read-only snapshot taken then; stats are judged against that
    moment (a write just after it, in the same clock tick, must not pass for this one).
    ``stats``: ``top`` is a copy whose files are new inodes (reflinks); each file is judged,
    and cached, by the stat its original had when copied, so that the cache serves the
    original folder and the next copy alike.
    """
    started = time.time_ns() if taken_ns is None else taken_ns
    walk = _Walk(str(top), cache, watch, stats)
    walk.tree("")
    return _walked(top, store, _Sink(store, writer, defer), walk, cache, progress, started,
                   reference)


def _walked(top: Path, store: PackStore, sink: _Sink, walk: _Walk, cache: StatCache,
            progress: Progress | None, started: int,
            reference: Reference | None = None) -> SnapshotResult:
    """The snapshot of a folder ``walk`` has listed whole: its files read, its trees made
    (but for those the cache says are unchanged)."""
    result = SnapshotResult(Root(ObjectId(b""), 0, 0, 0, 0), walk.hits, folders=walk.folders,
                            linked={path for path, _ in walk.linked}, looked_at=walk.looked_at)
    # A copy's folders are new inodes (reflinks): none of its trees can be found in the cache.
    reused = _reusable(walk, cache, store) if walk.stats is None else {}
    _complete(top, store, sink, walk, cache, progress, result, started,
              set(walk.folders) - reused.keys(), reference=reference, reused=reused)
    return result


def _reusable(walk: _Walk, cache: StatCache, store: PackStore) -> dict[str, ObjectId]:
    """The folders of a whole walk whose trees are those their cache entries name: the
    folder is the one the entry saw (its ctime and inode when its own listing began: a name
    added, removed or renamed in it changes its ctime), each file in it matches its own cache
    entry (none is to be read, no empty file differs), no entry in it changed since (each
    one's ctime is older than the entry's snapshot; a file's content, mode or owner changes
    its ctime), it has no symlink (which no entry vouches for), and the same holds for every
    folder beneath it. A no-change commit of 200,000 files then encodes no tree at all."""
    candidates: dict[str, ObjectId] = {}
    for rel, newest in walk.newest.items():
        e = cache.get(folder_key(rel))
        if e is None or not e[5] & FOLDER:
            continue
        ctime, ino = walk.dirs[rel]
        if ctime == e[2] and ino == e[3] and newest < e[1] and ctime < e[1]:
            candidates[rel] = ObjectId(e[4])
    if not candidates:
        return {}
    lost = store.missing(candidates.values())  # collected since: made again
    found: dict[str, ObjectId] = {}
    for rel in sorted(candidates, key=_depth, reverse=True):  # beneath before above
        oid, prefix = candidates[rel], rel + "/" if rel else ""
        if oid not in lost and all(prefix + str(r[0]) in found
                                   for r in walk.folders[rel] if r[1] == DIR):
            found[rel] = oid
    return found


def _depth(rel: str) -> int:
    return rel.count("/") + bool(rel)


def snapshot_cached(top: Path, store: PackStore, writer: PackWriter | None, cache: StatCache,
                    taken_ns: int) -> SnapshotResult | None:
    """:func:`snapshot` of a folder nothing writes meanwhile (a working set whose writers are
    stopped), if no file of it has to be read (each one's stat matches ``cache``), else
    None. One walk: a reset tells from it whether the working state it discards is worth
    keeping, without reading any file."""
    if not largest_unchanged(top, cache):
        return None
    walk = _Walk(str(top), cache, None)
    walk.tree("", until_a_read=True)  # a changed state is told from its first changed folder
    if walk.reads:
        return None
    return _walked(top, store, _Sink(store, writer), walk, cache, None, taken_ns)


def changed_paged(top: Path, cache: StatCache, count: int = WARM_COUNT) -> list[bytes]:
    """The largest paged files ``cache`` holds whose stat at ``top`` is no longer the one it
    holds: those a commit taken now will compare with its reference (:meth:`Reference.warm`).
    A file changed after this look is compared when the walk finds it, as any other."""
    import heapq

    files = ((e[0], rel) for rel, e in cache.items()
             if e[0] >= WARM_MIN and e[5] & CHUNKED and chunker.is_paged(e[0]))
    out: list[bytes] = []
    for _, rel in heapq.nlargest(count, files):
        e = cache[rel]
        try:
            st = os.lstat(os.path.join(top, os.fsdecode(rel)))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and chunker.is_paged(st.st_size) and (
                e[5] & HINT_ONLY or (e[0], e[1], e[2], e[3])
                != (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)):
            out.append(rel)
    return out


def largest_unchanged(top: Path, cache: StatCache, count: int = 16) -> bool:
    """Whether the ``count`` largest files of ``cache`` still match it: databases are the
    files that change, and they are the largest, so a changed state is usually told by a
    few stats rather than a walk. True says nothing about the other files."""
    import heapq

    files = ((rel, e) for rel, e in cache.items() if not e[5] & FOLDER)
    for rel, old in heapq.nlargest(count, files, key=lambda item: item[1][0]):
        if old[5] & HINT_ONLY:
            return False
        try:
            st = os.lstat(os.path.join(top, os.fsdecode(rel)))
        except OSError:  # gone, or a folder on its path is not one any more
            return False
        if not (stat.S_ISREG(st.st_mode) and old[0] == st.st_size
                and old[1] == st.st_mtime_ns and old[2] == st.st_ctime_ns
                and old[3] == st.st_ino):
            return False
    return True


def update(top: Path, store: PackStore, writer: PackWriter | None, prev: SnapshotResult,
           changed: dict[str, set[str]], fresh: Collection[str] = frozenset(),
           progress: Progress | None = None, defer: bool = False,
           watch: Watch | None = None, reference: Reference | None = None,
           taken_ns: int | None = None) -> SnapshotResult:
    """The snapshot of ``top`` when only the names in ``changed`` (folder -> names) may differ
    from ``prev``, a snapshot taken moments ago: only those are looked at, so the cost follows
    the changes, not the folder. Folders in ``fresh`` (made or moved in since) are listed whole.
    ``reference`` and ``taken_ns`` as for :func:`snapshot`.

    ``prev`` is consumed. The result equals what :func:`snapshot` would return.
    """
    started = time.time_ns() if taken_ns is None else taken_ns
    walk = _Walk(str(top), prev.cache, watch)
    folders = walk.folders = dict(prev.folders)
    cache = dict(prev.cache)
    linked = set(prev.linked)
    total = prev.total_size
    dirty: set[str] = set()  # folders whose trees are encoded again
    walked: set[str] = set()  # folders listed whole

    def drop(path: str, row: Row) -> None:
        """Forget ``path`` (and, for a folder, everything beneath it)."""
        nonlocal total
        if row[1] == FILE:
            total -= int(row[6])  # type: ignore[call-overload]
            cache.pop(os.fsencode(path), None)
            linked.discard(path)
            return
        if row[1] != DIR:
            return
        inner = path + "/"
        for sub in [f for f in folders if f == path or f.startswith(inner)]:
            for r in folders.pop(sub):
                if r[1] == FILE:
                    total -= int(r[6])  # type: ignore[call-overload]
        key = os.fsencode(inner)
        for k in [k for k in cache if k.startswith(key)]:
            del cache[k]
        linked.difference_update([p for p in linked if p.startswith(inner)])

    def visit(rel: str, names: set[str]) -> None:
        """Look again at ``names`` in folder ``rel``."""
        rows = folders.get(rel)
        if rows is None or rel in walked:
            return  # removed, or new and listed whole: its parent's entry tells
        prefix = rel + "/" if rel else ""
        kept = [r for r in rows if r[0] not in names]
        old = {str(r[0]): r for r in rows if r[0] in names}
        present = []
        for name in sorted(names):
            try:
                present.append(scan.entry(name, os.lstat(os.path.join(walk.top, prefix + name))))
            except (FileNotFoundError, NotADirectoryError):
                pass
        new_rows: list[Row] = []
        subdirs = walk.rows(rel, present, new_rows)
        for name, r in old.items():
            if not (r[1] == DIR and prefix + name in subdirs and prefix + name not in fresh):
                drop(prefix + name, r)
        for r in new_rows:
            sub = prefix + str(r[0])
            if sub in subdirs:
                before = old.get(str(r[0]))
                if (before is not None and before[1] == DIR and sub not in fresh
                        and sub in folders):
                    r[7] = before[7]  # the same folder: its contents change only by name
                else:
                    listed = walk.tree(sub)
                    dirty.update(listed)
                    walked.update(listed)
        folders[rel] = kept + new_rows
        while True:  # this folder and its parents get new trees
            dirty.add(rel)
            if not rel:
                break
            rel = rel.rpartition("/")[0]

    for rel in sorted(changed, key=lambda r: (r.count("/"), r) if r else (-1, r)):
        visit(rel, changed[rel])
    # A file that just got another name here: its older names see no event for writes
    # through the new one, so look at every name of that inode.
    inodes = {ino for path, ino in walk.linked if path not in linked}
    if inodes:
        again: dict[str, set[str]] = {}
        for key, entry in prev.cache.items():
            if entry[3] in inodes and not entry[5] & FOLDER:
                parent, _, name = os.fsdecode(key).rpartition("/")
                if name not in changed.get(parent, ()):
                    again.setdefault(parent, set()).add(name)
        for rel, names in again.items():
            visit(rel, names)
    cache.update(walk.hits)
    linked.update(path for path, _ in walk.linked)
    walk.total += total
    result = SnapshotResult(Root(ObjectId(b""), 0, 0, 0, 0), cache, folders=folders,
                            linked=linked, recent=prev.recent if watch else {},
                            looked_at=walk.looked_at)
    # Files under folders listed whole were counted by the walk; the rest already are in total.
    _complete(top, store, _Sink(store, writer, defer), walk, prev.cache, progress, result,
              started, dirty, prev.root.tree, prev.recent, reference=reference)
    return result


def since_reference(top: Path, store: PackStore, writer: PackWriter | None, cache: StatCache,
                    reference: Reference, inodes: Collection[int], taken_ns: int,
                    progress: Progress | None = None,
                    where: Collection[str] | None = None) -> SnapshotResult | None:
    """:func:`snapshot` of ``top``, a read-only snapshot, when the filesystem says that only
    the ``inodes`` may differ from ``reference`` (see ``FolderBackend.changed_inodes``),
    and, with ``where``, that only those folders (and every one above them) hold them: the
    reference's commit gives those folders' rows, their names are listed (no ``lstat``),
    and only the names of those inodes, or added or removed, are looked at
    (:func:`update`); every other folder keeps its tree unread. No file's inode is looked
    up: a walk of the 5,000 files of a 2 GiB dot took 56-61 ms, most of it the first
    ``lstat`` of a new snapshot's inodes. Without ``where``, every folder is listed and its
    tree read (100,000 files in 1,000 folders, one changed: a commit 0.9-1.1 s, against
    1.6-1.8 s walking).

    None if the folders contradict what the filesystem said (a folder whose names changed
    though its inode did not), a folder cannot be listed, or the reference's trees cannot
    be read: the caller then walks the whole folder. ``total_size`` is left 0 when only
    some folders were read."""
    folders = _folders_of(store, reference.tree, where, reference.trees_read())
    if folders is None:
        return None
    try:
        inode_of: dict[str, int] = {"": os.lstat(top).st_ino}
    except OSError:
        return None
    changed: dict[str, set[str]] = {}
    fresh: set[str] = set()
    total = 0
    for rel in sorted(folders):  # a folder after its parent, whose listing has its inode
        rows = folders[rel]
        total += sum(int(r[6]) for r in rows if r[1] == FILE)  # type: ignore[call-overload]
        own = inode_of.get(rel)
        if own is None:  # not a folder in its parent now: the parent's change says so
            continue
        prefix = rel + "/" if rel else ""
        try:
            now, subdirs = _stored_names(os.path.join(top, rel))
        except OSError:
            return None
        before = {str(r[0]): r for r in rows}
        names = {name for name, ino in now.items() if ino in inodes}
        moved = now.keys() ^ before.keys()
        if moved and own not in inodes:
            return None  # names changed in a folder the filesystem says did not change
        names |= moved
        for name, r in before.items():
            if r[1] == DIR and name in subdirs:
                inode_of[prefix + name] = now[name]
                if name in names and not _same_inode(reference.folder, prefix + name,
                                                     now[name]):
                    fresh.add(prefix + name)  # another folder moved in under the name
        if names:
            changed[rel] = names
    prev = SnapshotResult(Root(reference.tree, 0, 0, 0, 0), cache, total_size=total,
                          folders=folders)
    got = update(top, store, writer, prev, changed, fresh, progress, reference=reference,
                 taken_ns=taken_ns)
    if where is not None:
        got.total_size = 0  # not known: the folders not read hold files too
    return got


def _stored_names(folder: str) -> tuple[dict[str, int], set[str]]:
    """The names of a folder that a tree may hold (files, folders, symlinks: not sockets,
    FIFOs or devices) with their inodes, and which of them are folders, from the listing's
    types alone (no ``lstat``). The folder itself must not be a symlink: a snapshot's
    folders are listed only as their parents' listings found them."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    finally:
        os.close(fd)
    names: dict[str, int] = {}
    subdirs: set[str] = set()
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            subdirs.add(e.name)
        elif not (e.is_file(follow_symlinks=False) or e.is_symlink()):
            continue
        names[e.name] = e.inode()
    return names, subdirs


def _same_inode(folder: Path, rel: str, ino: int) -> bool:
    """Whether ``rel`` under ``folder`` is a folder with inode ``ino`` (a snapshot keeps its
    source's inode numbers)."""
    try:
        st = os.lstat(os.path.join(folder, rel))
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == ino


def _folders_of(store: PackStore, tree: ObjectId, where: Collection[str] | None = None,
                read: Mapping[ObjectId, list[Row]] | None = None
                ) -> dict[str, list[Row]] | None:
    """Every folder's tree rows under the tree ``tree`` of this store, by relative path (the
    rows :class:`_Walk` makes), or only the top's and those in ``where`` (which holds every
    folder above each one it holds); None if a tree is missing or not one dm writes. Trees
    in ``read`` were read already (:meth:`Reference.warm_trees`)."""
    folders: dict[str, list[Row]] = {}
    todo = [("", tree)]
    while todo:
        rel, oid = todo.pop()
        rows = read.get(oid) if read is not None else None
        if rows is None:
            rows = _tree_rows(store, oid)
            if rows is None:
                return None
        prefix = rel + "/" if rel else ""
        for r in rows:
            if r[1] == DIR:
                path = prefix + cast(str, r[0])
                if where is None or path in where:
                    todo.append((path, ObjectId(bytes.fromhex(cast(str, r[7])))))
        folders[rel] = rows
    return folders


def _tree_rows(store: PackStore, oid: ObjectId) -> list[Row] | None:
    """A tree's rows as :class:`_Walk` makes them; None if it is missing or not one dm
    writes. Objects are checked against their ids as they are read, and the trees of a
    commit were checked before it was stored: only each row's shape, name and size are
    looked at here, and a folder's id, not every field as ``Tree.decode`` does (a quarter
    of the time)."""
    head = MAGIC_TREE + b"\n"
    try:
        data = store.get(oid)
        rows = json.loads(data[len(head):]) if data.startswith(head) else None
    except Exception:  # a damaged or missing tree: the whole walk then
        return None
    if not isinstance(rows, list):
        return None
    for r in rows:
        if not (isinstance(r, list) and len(r) == 9 and isinstance(r[0], str)
                and r[0] not in ("", ".", "..") and "/" not in r[0] and "\0" not in r[0]
                and type(r[6]) is int):
            return None
        if r[1] == DIR and not (isinstance(r[7], str) and _HEX.fullmatch(r[7])):
            return None
    return rows


def _complete(top: Path, store: PackStore, sink: _Sink, walk: _Walk, hints: StatCache,
              progress: Progress | None, result: SnapshotResult, started: int,
              dirty: set[str], unchanged_root: ObjectId | None = None,
              recent: Recent | None = None, reference: Reference | None = None,
              reused: dict[str, ObjectId] | None = None) -> None:
    """Read the queued files; then give them content ids, fill their rows and cache entries,
    and store the trees of the ``dirty`` folders. With a deferring sink (in a freeze) only the
    reading happens now; :meth:`SnapshotResult.finish` does the rest after the thaw.

    ``reused``: the walk was whole, and these folders keep the trees named (the others are
    ``dirty``); every folder gets its cache entry. Else (an update) the ``dirty`` folders
    listed whole get theirs, and the other ``dirty`` ones lose theirs.
    """
    if walk.reads:
        _read_files(walk.reads, store, sink, hints, recent or {}, progress, result, reference)
    top_st = os.lstat(top)
    result.frozen_bytes_read = result.bytes_read if sink.defer else 0

    def rest() -> None:
        # Only a live commit's pre-copy passes (which watch) are followed by another pass.
        _assemble(walk.reads, store, sink, hints, result, walk.watch is not None)
        limit = started - RACY_NS
        total = walk.total
        cache = result.cache
        for f in walk.reads:
            f.row[6], f.row[7], f.row[8] = f.size, f.content.hex() if f.content else None, \
                int(f.chunked)
            total += f.size - f.st.st_size
            st = f.st
            entry = CacheEntry.of(f.size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, f.content,
                                  f.chunked)
            if st.st_mtime_ns >= limit or st.st_ctime_ns >= limit:
                # Written too recently to trust its stat next time; its content is still the
                # best guess of the next version, for the fingerprints and known chunks.
                entry = entry._replace(flags=entry.flags | HINT_ONLY)
            cache[f.rel] = entry
        result.total_size = total
        root_tree = _store_trees(sink, result.folders, dirty, unchanged_root, reused or {})
        result.root = Root(root_tree, stat.S_IMODE(top_st.st_mode), top_st.st_uid,
                           top_st.st_gid, top_st.st_mtime_ns)
        if walk.stats is not None:
            pass  # a copy's folders are new inodes: entries for them would never be used
        elif reused is None:  # an update: of the folders looked at again, only those listed
            # whole get entries (the rest of their rows are only as new as the change set)
            whole = dirty & walk.dirs.keys()
            for rel in dirty - whole:
                cache.pop(folder_key(rel), None)
            _cache_folders(cache, hints, result.folders, whole, root_tree, limit, walk)
        else:  # a reused folder keeps its entry as it was: a no-change commit saves no cache
            cache.update((folder_key(rel), hints[folder_key(rel)]) for rel in reused)
            _cache_folders(cache, hints, result.folders, result.folders.keys() - reused.keys(),
                           root_tree, limit, walk)
        result.unstored_trees = sink.trees
        result.deferred = sink.deferred

    if sink.defer:
        result.pending = rest  # in a freeze: only the reading could not wait for the thaw
    else:
        rest()


def _store_trees(sink: _Sink, folders: dict[str, list[Row]], dirty: set[str],
                 root_tree: ObjectId | None, reused: dict[str, ObjectId]) -> ObjectId:
    """Store the trees of the ``dirty`` folders, children before parents, and name those of
    the ``reused`` ones in their parents' rows; returns the top's tree."""
    where: dict[str, dict[object, int]] = {}  # folder -> its rows' positions by name
    for rel in sorted(dirty | reused.keys(), key=_depth, reverse=True):
        oid = reused.get(rel) or sink.put(KIND_TREE, encode_tree_rows(folders[rel]))
        if not rel:
            root_tree = oid
            continue
        parent, _, name = rel.rpartition("/")
        pos = where.get(parent)
        if pos is None:  # copies: a folder's rows may be shared with the previous snapshot
            siblings = folders[parent] = list(folders[parent])
            pos = where[parent] = {r[0]: i for i, r in enumerate(siblings)}
        siblings = folders[parent]
        r = siblings[pos[name]]
        siblings[pos[name]] = [*r[:7], oid.hex(), 0]
    assert root_tree is not None
    return root_tree


def _cache_folders(cache: StatCache, old: StatCache, folders: dict[str, list[Row]],
                   which: Iterable[str], root_tree: ObjectId, limit: int, walk: _Walk) -> None:
    """Give the folders ``which`` their cache entries: their trees, by their rows in their
    parents, and their (ctime, inode) as their listing saw them (not listed: gone, no
    entry); see :class:`~dotmesh.meta.statcache.CacheEntry`. An ``old`` entry that says the
    same is kept as it is (it stays true) unless an entry in the folder changed past its
    limit (a chmod to the same mode): a commit that changed nothing saves no cache."""
    trees: dict[str, object] = {"": root_tree.hex()}
    for parent in {rel.rpartition("/")[0] for rel in which if rel}:
        prefix = parent + "/" if parent else ""
        trees.update((prefix + str(r[0]), r[7]) for r in folders.get(parent, ()) if r[1] == DIR)
    for rel in which:
        key, seen, tree = folder_key(rel), walk.dirs.get(rel), trees.get(rel)
        if seen is None or not isinstance(tree, str):
            cache.pop(key, None)
            continue
        raw = bytes.fromhex(tree)
        was = old.get(key)
        newest = walk.newest.get(rel, 0)
        if (was is not None and was[5] & FOLDER and (was[2], was[3], was[4]) == (*seen, raw)
                and (newest < was[1] or newest == NOT_REUSED)):
            cache[key] = was
        else:
            cache[key] = (0, limit, seen[0], seen[1], raw, FOLDER | HAS_CONTENT)


def _read_files(to_read: list[_File], store: PackStore, sink: _Sink, cache: StatCache,
                recent: Recent, progress: Progress | None, result: SnapshotResult,
                reference: Reference | None = None) -> None:
    """Chunk, hash and store the files in ``to_read`` on WORKERS threads. Their previous
    versions (to spare hashing) come from ``recent`` or, failing that, ``cache``; a paged
    file that ``reference`` shares blocks with is read only where it does not."""
    expect = getattr(progress, "expect", None)  # a meter that shows a total (cli/render.py)
    if expect is not None:
        expect(sum(f.st.st_size for f in to_read))

    memo_lock = threading.Lock()
    memo: dict[bytes, tuple[frozenset[bytes], chunker.Previous | None]] = {}

    def small_job(batch: list[_File]) -> Callable[[], int]:
        def run() -> int:
            buf = _buffer()
            view = memoryview(buf)
            pos, offsets, lengths, read = 0, [], [], []
            for f in batch:
                got = _read_small(f.path, view[pos:pos + chunker.SMALL_FILE])
                if not got:
                    f.content, f.size = None, 0
                    continue
                offsets.append(pos)
                lengths.append(got)
                read.append(f)
                pos += got
            if not read:
                return 0
            known = frozenset(k for f in read for k in _as_known(memo.get(f.rel) or _previous(
                store, cache.get(f.rel)), f.st.st_size)[0])
            pairs = sink.take(chunker.chunk_files(view, offsets, lengths, known, sink.missing,
                                                  sink.pack))
            for f, pair in zip(read, pairs, strict=True):
                f.parts = [[pair]]
            return pos
        return run

    # Blocks the reference shares, by file and by segment (each segment's job sees only its own)
    shared: dict[bytes, dict[int, frozenset[int]]] = {}

    def known_for(f: _File) -> tuple[frozenset[bytes], chunker.Previous | None]:
        """The previous version's chunks (see :func:`_previous`), looked up once per file,
        not once per segment."""
        with memo_lock:
            got = memo.get(f.rel)
            if got is None and f.rel in recent:
                got = recent[f.rel]()
            if got is not None:
                got = memo[f.rel] = _as_known(got, f.st.st_size)
            if got is None and reference is not None and chunker.is_paged(f.st.st_size):
                ref = reference.blocks(store, f.rel, f.path)
                if ref is not None:
                    per = chunker.SEGMENT // chunker.PAGE_BLOCK
                    by_segment: dict[int, set[int]] = {}
                    for b in ref[1]:
                        by_segment.setdefault(b // per, set()).add(b)
                    shared[f.rel] = {k: frozenset(v) for k, v in by_segment.items()}
                    got = memo[f.rel] = frozenset(), ref[0]  # known by position
            if got is None:
                got = memo[f.rel] = _as_known(_previous(store, cache.get(f.rel)),
                                              f.st.st_size)
            return got

    def medium_job(batch: list[_File]) -> Callable[[], int]:
        """Files cut by CDC that fit the buffer together, read side by side: one index
        lookup for the batch, not one per file (a first commit has thousands)."""
        def run() -> int:
            buf = _buffer()
            view = memoryview(buf)
            pos = 0
            offsets: list[int] = []
            lengths: list[int] = []
            counts: list[int] = []
            for f in batch:  # (one that grew past its slot is cut: its stat changed)
                got = _read_small(f.path, view[pos:pos + min(MEDIUM_FILE, len(buf) - pos)])
                cuts = chunker.cdc_cuts(view[pos:pos + got]) if got else []
                offsets.extend(pos + o for o, _ in cuts)
                lengths.extend(n for _, n in cuts)
                counts.append(len(cuts))
                pos += got
            known = frozenset(k for f in batch for k in known_for(f)[0])
            pairs = sink.take(chunker.chunk_files(view, offsets, lengths, known, sink.missing,
                                                  sink.pack)) if offsets else []
            at = 0
            for f, n in zip(batch, counts, strict=True):
                f.parts = [pairs[at:at + n]]
                at += n
            return pos
        return run

    def big_job(f: _File, start: int, length: int, idx: int) -> Callable[[], int]:
        def run() -> int:
            known, prev = known_for(f)
            buf = _buffer()
            try:
                fd = _open_file(f.path)
            except FileNotFoundError:  # vanished since the scan: record it as empty
                return 0
            skipped = 0
            try:
                if chunker.is_paged(f.st.st_size):
                    got = chunker.chunk_paged(fd, start, length, buf, known, sink.missing,
                                              prev, sink.pack,
                                              shared.get(f.rel, {}).get(idx, frozenset()))
                    f.fingerprints[idx] = got.fingerprints
                    parts = [sink.take(got)]
                    skipped = got.skipped
                else:
                    parts = [sink.take(r) for r in chunker.chunk_cdc(fd, buf, known,
                                                                     sink.missing, sink.pack)]
            finally:
                os.close(fd)
            f.parts[idx] = [c for p in parts for c in p]
            if all(f.parts):
                memo.pop(f.rel, None)  # the file is done: let its set go
            return sum(n for p in parts for _, n in p) - skipped
        return run

    def segment_jobs(f: _File) -> list[Callable[[], int]]:
        size = f.st.st_size
        n = (size + chunker.SEGMENT - 1) // chunker.SEGMENT
        f.parts = [[] for _ in range(n)]
        f.fingerprints = [b""] * n
        return [big_job(f, i * chunker.SEGMENT, min(chunker.SEGMENT, size - i * chunker.SEGMENT),
                        i) for i in range(n)]

    def patch_job(f: _File, changes: _Changes) -> Callable[[], int]:
        def run() -> int:
            try:
                got = _patch(reference, sink, f.rel, f.path, f.st, changes)
            except FileNotFoundError:  # vanished since the scan: record it as empty
                return 0
            if got is None:  # not what the reference said: read it all, here
                return sum(job() for job in segment_jobs(f))
            f.patched = got
            # Stored here, beside the other jobs, not by _assemble one after the other
            f.content = sink.put(KIND_FILELIST, got.filelist)
            return got.read
        return run

    def read_job(f: _File, got: chunker.Patched, content: ObjectId) -> Callable[[], int]:
        def run() -> int:  # read ahead (Reference.read_ahead): only counted here
            f.patched, f.content = got, content
            return got.read
        return run

    def done(n: int) -> None:
        result.bytes_read += n
        if progress:
            progress(n)

    if (reference is None and sink.writer is not None and not sink.defer
            and sum(f.st.st_size for f in to_read) >= FORK_MIN
            and len(to_read) <= FORK_MAX_FILES
            and _read_forked(to_read, store, sink, cache, memo, known_for, small_job,
                             medium_job, segment_jobs, big_job, done)):
        result.files_read += len(to_read)
        return

    pool = shared_pool()
    started: list[Future[Any]] = []  # every comparison and job given to the pool

    def all_jobs() -> Iterator[Callable[[], int]]:
        """Every file's jobs. The extent maps of paged files are compared on the pool first
        (two maps of thousands of extents each per file: 10-50 ms, mostly the kernel's), so
        the comparisons run side by side and beside the other files' reads."""
        planned: list[tuple[_File, Future[_Read] | None]] = []
        for kind, files in _grouped(to_read):
            if kind == "small":
                yield small_job(files)
            elif kind == "medium":
                yield medium_job(files)
            elif kind == "paged":
                comparing = None
                if reference is not None:
                    comparing = reference.comparing(store, files[0].rel, files[0].path)
                    started.append(comparing)
                planned.append((files[0], comparing))
            else:
                files[0].parts = [[]]
                yield big_job(files[0], 0, files[0].st.st_size, 0)
        for f, comparing in planned:
            changes, done_ahead = (None, None) if comparing is None else comparing.result()
            if done_ahead is not None and _same_stat(done_ahead[2], f.st):
                yield read_job(f, done_ahead[0], done_ahead[1])
            elif changes is not None and _patchable(changes):
                yield patch_job(f, changes)
            else:
                yield from segment_jobs(f)

    run_windowed(pool, all_jobs(), started, done)
    result.files_read += len(to_read)


def _patchable(changes: _Changes) -> bool:
    """Is a paged file's change small enough to be read by one job (else by segments)?"""
    return sum(e - s for s, e in changes[2]) * chunker.PAGE_BLOCK <= PATCH_LIMIT


def _same_stat(a: os.stat_result | scan.Lstat, b: os.stat_result | scan.Lstat) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _patch(reference: Reference | None, sink: _Sink, rel: bytes, path: str,
           st: os.stat_result | scan.Lstat, changes: _Changes) -> chunker.Patched | None:
    """A paged file's new list made from ``changes`` (its reference's list and what changed)
    by reading only the changed pages: from the working file where its extents vouch for
    them (:func:`_patch_live`), else from the snapshot at ``path``. Its new blocks are
    stored; None if the file is not what the reference said (then it is read whole).
    Raises FileNotFoundError if it vanished."""
    base, fps, runs, extents = changes
    got = None
    if reference is not None and reference.live is not None:
        got = _patch_live(os.path.join(reference.live, os.fsdecode(rel)), st, base, fps, runs,
                          extents, sink)
    if got is None:
        fd = _open_file(path)
        try:
            got = chunker.patch_paged(fd, st.st_size, base, fps, runs, _buffer(), sink.missing,
                                      sink.pack)
        finally:
            os.close(fd)
    if got is not None:
        sink.take(chunker.Chunks([], [], got.new))
    return got


def _patch_live(live: str, st: os.stat_result | scan.Lstat, base: bytes, fps: bytes | None,
                runs: list[tuple[int, int]], extents: list[btrfs.Extent], sink: _Sink
                ) -> chunker.Patched | None:
    """:func:`chunker.patch_paged` of a snapshot's file (stat ``st``, extents ``extents``),
    reading its changed pages from the file it was taken of (``live``), where they are
    usually still in memory: a snapshot's files are inodes of their own, so its pages
    always come from the disk (45-250 ms for the 730 pages of each file of a 1% commit).

    The bytes read are the snapshot's if, after the read, every byte of the runs read
    still maps to the disk address it has in the snapshot. A copy-on-write filesystem
    never writes in place a block a snapshot shares, and the map is made once what was
    written before it is on disk (:func:`btrfs.flushed_extents`), so a write made before
    or during the read is somewhere else by then, and shows. Only plain extents vouch for
    their bytes (:func:`btrfs.same_within`): a hole has no address (written, read and
    punched again, it looks as it did), and a compressed extent's address is not its
    bytes'; pages there come from the snapshot. (What it cannot see: the very extents the
    snapshot holds cloned or deduplicated back into the file between a write and this
    look, which nothing does while the commit holds the dot's lock.) None if the file is
    not the same inode or any byte moved: the caller then reads the snapshot. A refused
    read stores nothing (its blocks are stored by the caller, from the read it keeps).
    Only tried when no writer is known to run (``Reference.live``): a writer's pages
    would mostly be refused, and the flush is paid by the app's file."""
    try:
        fd = _open_file(live)
    except OSError:
        return None
    try:
        mine = os.fstat(fd)
        if mine.st_ino != st.st_ino or mine.st_size < st.st_size:
            return None
        # the working file's pages are usually in memory: no read-ahead hints for them
        got = chunker.patch_paged(fd, st.st_size, base, fps, runs, _buffer(), sink.missing,
                                  sink.pack, advise=False)
        if got is None:
            return None
        now = btrfs.flushed_extents(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    wanted = [(a * chunker.PAGE_BLOCK, b * chunker.PAGE_BLOCK) for a, b in runs]
    return got if btrfs.same_within(extents, now, wanted) else None


def _grouped(to_read: list[_File]) -> Iterator[tuple[str, list[_File]]]:
    """The files to read, as the jobs that read them: batches of "small" files (one chunk
    each) and of "medium" ones (cut by CDC, read side by side), and "paged" and "whole" (cut
    by CDC) files of their own, in the order of ``to_read``."""
    small: list[_File] = []
    small_bytes = 0
    medium: list[_File] = []
    medium_bytes = 0
    medium_count = max(1, chunker.SEGMENT // MEDIUM_FILE)  # each has a slot that size
    for f in to_read:
        size = f.st.st_size
        if size <= chunker.SMALL_FILE:
            small.append(f)
            small_bytes += size
            if small_bytes >= SMALL_BATCH or len(small) >= 512:
                yield "small", small
                small, small_bytes = [], 0
        elif chunker.is_paged(size):
            yield "paged", [f]
        elif size <= MEDIUM_FILE:
            medium.append(f)
            medium_bytes += size
            if medium_bytes >= MEDIUM_BATCH or len(medium) >= medium_count:
                yield "medium", medium
                medium, medium_bytes = [], 0
        else:
            yield "whole", [f]
    if small:
        yield "small", small
    if medium:
        yield "medium", medium


_ForkedJob = tuple[Callable[[], int], list[_File], int]  # a job, its files, its segment (or -1)


def _read_forked(to_read: list[_File], store: PackStore, sink: _Sink, cache: StatCache,
                 memo: dict[bytes, tuple[frozenset[bytes], chunker.Previous | None]],
                 known_for: Callable[[_File], object],
                 small_job: Callable[[list[_File]], Callable[[], int]],
                 medium_job: Callable[[list[_File]], Callable[[], int]],
                 segment_jobs: Callable[[_File], list[Callable[[], int]]],
                 big_job: Callable[[_File, int, int, int], Callable[[], int]],
                 done: Callable[[int], None]) -> bool:
    """:func:`_read_files`' jobs in WORKERS child processes (:mod:`forked`), each with a
    GIL of its own and packs of its own to write (on threads, the pack writes, the kernel's
    copies included, ran one at a time under the writer's lock).

    Previous versions of the files are looked up here first: children never use SQLite (a
    connection must not cross a fork, and a new one would share this process's state of
    the file). A child asks this process which of its chunks are new: those the index lacks
    and no other child was told of (so none is stored twice). It writes them into packs
    lent by the writer, and sends back its files' chunk lists and the rows of what it
    wrote. False, with nothing read, when no child could be forked, or when the plan is too
    big to share by copy on write (FORK_MAX_FILES files, FORK_MAX_PREVIOUS ids of previous
    versions)."""
    writer = sink.writer
    assert writer is not None
    jobs: list[_ForkedJob] = []  # the longest first: files cut by CDC, then paged ones
    cdc: list[_ForkedJob] = []
    paged: list[_ForkedJob] = []
    for kind, files in _grouped(to_read):
        if kind == "small":
            for f in files:
                old = cache.get(f.rel)
                if old is not None and old[5] & CHUNKED:  # its chunks' list is in the store
                    memo[f.rel] = _as_known(_previous(store, old), f.st.st_size)
            jobs.append((small_job(files), files, -1))
            continue
        for f in files:
            known_for(f)
        if kind == "medium":
            jobs.append((medium_job(files), files, -1))
        elif kind == "paged":
            paged.extend((job, files, i) for i, job in enumerate(segment_jobs(files[0])))
        else:
            files[0].parts = [[]]
            cdc.append((big_job(files[0], 0, files[0].st.st_size, 0), files, 0))
    if sum(len(known) for known, _ in memo.values()) > FORK_MAX_PREVIOUS:
        return False
    cdc.sort(key=lambda j: -j[1][0].st.st_size)
    jobs = cdc + paged + jobs
    # Told to a child as new, so stored by that child; and what this writer holds unindexed
    claimed: set[ObjectId] = set(writer.ids())

    def answer(kind: str, value: object) -> object:
        if kind == "missing":  # what no one claimed and the index lacks is the asker's
            fresh = cast(set[ObjectId], value) - claimed
            need = store.missing(fresh) if fresh else set()
            claimed.update(need)
            return need
        if kind == "pack":
            return writer.lend(cast("int | None", value))
        raise InternalError(f"a reading process asked {kind!r}")

    def setup(link: forked.Link) -> None:
        sink.parent = link
        sink.filler = PackFiller(store.dir, lambda full: cast(
            "tuple[int, str, int]", link.ask("pack", full)))

    def one(k: int) -> tuple[int, list[tuple[object, ...]], dict[ObjectId, Any]]:
        job, files, seg = jobs[k]
        n = job()
        if seg < 0:
            back: list[tuple[object, ...]] = [(f.parts, f.content, f.size) for f in files]
        else:
            f = files[0]
            part = f.parts[seg]
            back = [(part if isinstance(part, _Entries) else _Entries.of(part),
                     f.fingerprints[seg] if f.fingerprints else None)]
        assert sink.filler is not None
        return n, back, sink.filler.rows()

    def apply(k: int, got: tuple[int, list[tuple[Any, ...]], dict[ObjectId, Any]]) -> None:
        n, back, rows = got
        _, files, seg = jobs[k]
        if seg < 0:
            for f, (parts, content, size) in zip(files, back, strict=True):
                f.parts, f.content, f.size = parts, content, size
        else:
            f = files[0]
            f.parts[seg] = back[0][0]
            if back[0][1] is not None:
                f.fingerprints[seg] = back[0][1]
        writer.adopt(rows)
        done(n)

    try:
        ran = forked.run(range(len(jobs)), one, apply, workers=WORKERS, what="reading files",
                         answer=answer, setup=setup,
                         finish=lambda: cast(PackFiller, sink.filler).finish())
        writer.settle_lent()
        return ran
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a child's write into a lent pack
            raise writer.give_back(e) from None
        raise


def _assemble(to_read: list[_File], store: PackStore, sink: _Sink, cache: StatCache,
              result: SnapshotResult, keep_recent: bool) -> None:
    """Give each read file its content id (a file list for several chunks), keep its chunks
    in memory for a following pass, and save the fingerprints of paged files."""
    fingerprints: list[tuple[bytes, bytes]] = []
    superseded: list[bytes] = []  # fingerprints of versions this commit replaces
    for f in to_read:
        if f.patched is not None:  # a list patched in place and stored by its job
            f.chunked, f.size = True, f.st.st_size
            if sink.writer is not None and f.content is not None:
                fingerprints.append((f.content, f.patched.fingerprints))
                old = cache.get(f.rel)
                if old is not None and old[4] != f.content:
                    superseded.append(old[4])
            continue
        encoded: bytes | None = None
        if any(isinstance(p, _Entries) for p in f.parts):  # read by children: lists as sent
            parts = [p if isinstance(p, _Entries) else _Entries.of(p) for p in f.parts]
            count, f.size = sum(p.count for p in parts), sum(p.size for p in parts)
            if count > 1:
                encoded = filelist_of_entries([p.data for p in parts], count, f.size)
                chunks = []  # made only if wanted below
            else:
                chunks = filelist_chunks(filelist_of_entries([p.data for p in parts], count,
                                                             f.size))
        else:
            chunks = [c for p in f.parts for c in cast("list[tuple[ObjectId, int]]", p)]
            f.size = sum(map(itemgetter(1), chunks))
        if encoded is None and not chunks:
            f.content, f.chunked = None, False
        elif encoded is None and len(chunks) == 1 and chunks[0][0] != HOLE:
            f.content, f.chunked = chunks[0][0], False
        else:
            f.content = sink.put(KIND_FILELIST, encoded or encode_filelist(chunks))
            f.chunked = True
            fps = b"".join(f.fingerprints)
            if keep_recent:
                result.recent[f.rel] = _later(encoded, chunks, fps)
            if fps and sink.writer is not None:
                fingerprints.append((f.content, fps))
                old = cache.get(f.rel)
                if old is not None and old[4] != f.content:
                    superseded.append(old[4])
    if fingerprints:
        save_fingerprints(store.conn, fingerprints, superseded)


def _later(encoded: bytes | None, chunks: list[tuple[ObjectId, int]], fps: bytes
           ) -> Callable[[], tuple[frozenset[bytes], chunker.Previous | None]]:
    """A file's entry in :data:`Recent`: its chunks from ``chunks``, or from its list
    ``encoded``, once asked for (three lists of 68,000 blocks: 40 ms a commit)."""
    def made() -> tuple[frozenset[bytes], chunker.Previous | None]:
        got = chunks if encoded is None else filelist_chunks(encoded)
        ids = list(map(itemgetter(0), got))
        # (a paged file's blocks are found by position, as in _previous)
        if fps and chunker.page_lengths(list(map(itemgetter(1), got))):
            return frozenset(), chunker.Previous(ids, fps)
        return frozenset(ids), None
    return made


def run_windowed(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], int]],
                 started: list[Future[Any]], done: Callable[[int], None],
                 window: int = WORKERS * 2) -> None:
    """Run ``jobs`` on ``pool``, ``window`` of them given at once, calling ``done`` with each
    one's result as it ends, in whatever order: a long job does not hold back the next ones
    (taken in order, a 160 MiB dump cut by CDC at the head of the window left the other
    worker waiting for it). On an error, what is queued is dropped and what runs is
    waited for before it goes up: nothing goes on reading the store, or writing the pack,
    once the caller unwinds. ``started``: every future given to the pool, this function's
    and those ``jobs`` give it themselves."""
    running: set[Future[int]] = set()
    try:
        for job in jobs:
            fut = pool.submit(job)
            running.add(fut)
            started.append(fut)
            if len(running) >= window:
                ended, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in ended:
                    done(fut.result())
        for fut in running:
            done(fut.result())
    except BaseException:
        for given in started:
            given.cancel()
        wait(started)
        raise


def _open_file(path: str) -> int:
    """Open a file the scan found regular. One swapped meanwhile for something else counts
    as vanished: opened without O_NONBLOCK, a FIFO would wait for a writer forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "no longer a regular file", path)
    return fd


def _read_small(path: str, into: memoryview) -> int:
    """Read a small file into ``into``; a file that grew past SMALL_FILE is cut (rescanned next
    time, since its stat changed)."""
    try:
        fd = _open_file(path)
    except FileNotFoundError:  # vanished since the scan: record it as empty
        return 0
    try:
        got = 0
        while got < len(into):
            k = os.preadv(fd, [into[got:]], got)
            if k == 0:
                break
            got += k
        return got
    finally:
        os.close(fd)


