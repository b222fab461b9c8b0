"""Snapshot a folder into the store, reading only files whose stat changed since the last time.

The stat cache maps a relative path to (size, mtime_ns, ctime_ns, inode) and the content id that
those bytes had; an unchanged file costs one ``lstat``. Entries written less than RACY_NS before
the scan began are not trusted next time, since a write in the same clock tick would not show.
Each worker thread reuses one read buffer: first-touching fresh memory is slow on these VMs.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.model.objects import (
    DIR,
    FILE,
    HOLE,
    KIND_FILELIST,
    KIND_TREE,
    SYMLINK,
    Entry,
    FileList,
    ObjectId,
    Root,
    Tree,
    object_id,
)
from dotmesh.store import chunker
from dotmesh.store.packs import PackStore, PackWriter

RACY_NS = 100_000_000  # well above the timestamp tick of Linux filesystems (at most 10 ms)
WORKERS = 2
SMALL_BATCH = 4 << 20


@dataclass(frozen=True)
class CacheEntry:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    content: bytes | None
    chunked: bool


StatCache = dict[bytes, CacheEntry]
Progress = Callable[[int], None]


@dataclass
class SnapshotResult:
    root: Root
    cache: StatCache
    files_read: int = 0
    bytes_read: int = 0
    total_size: int = 0
    skipped: list[str] = field(default_factory=list)
    unstored_trees: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class _File:
    rel: bytes
    path: str
    st: os.stat_result
    content: bytes | None = None
    chunked: bool = False
    size: int = 0
    parts: list[list[tuple[bytes, int]]] = field(default_factory=list)


class _Sink:
    """Where workers send chunks: the pack writer, or nowhere when only hashing."""

    def __init__(self, store: PackStore, writer: PackWriter | None) -> None:
        self.store, self.writer = store, writer
        self.trees: dict[bytes, bytes] = {}  # what was not stored, for callers that diff

    def missing(self, oids: list[bytes]) -> set[bytes]:
        if self.writer is None:
            return set()
        fresh = [o for o in oids if o not in self.writer]
        return self.store.missing(fresh) if fresh else set()

    def take(self, chunks: chunker.Chunks) -> list[tuple[bytes, int]]:
        if chunks.new and self.writer is not None:
            self.writer.add_many(chunks.new)
        return list(zip(chunks.ids, chunks.lengths, strict=True))

    def put(self, kind: int, data: bytes) -> ObjectId:
        if self.writer is None:
            oid = object_id(data)
            if kind == KIND_TREE:
                self.trees[oid] = data
            return oid
        return self.writer.put(kind, data)


def _scan(top: str) -> tuple[list[tuple[str, list[tuple[str, os.stat_result]]]], list[str]]:
    """All folders (parents before children) with their entries' lstat results."""
    dirs: list[tuple[str, list[tuple[str, os.stat_result]]]] = []
    skipped: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        items: list[tuple[str, os.stat_result]] = []
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            for de in it:
                st = de.stat(follow_symlinks=False)
                child = f"{rel}/{de.name}" if rel else de.name
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
                elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    skipped.append(child)
                    continue
                items.append((de.name, st))
        dirs.append((rel, items))
    return dirs, skipped


_tls = threading.local()


def _buffer() -> bytearray:
    buf: bytearray | None = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = bytearray(chunker.SEGMENT)
    return buf


def _known_chunks(store: PackStore, old: CacheEntry | None) -> frozenset[bytes]:
    """Chunk ids of the file's previous version: present in the store, so never re-checked."""
    if old is None or old.content is None:
        return frozenset()
    if not old.chunked:
        return frozenset((old.content,))
    try:
        return frozenset(c for c, _ in FileList.decode(store.get(old.content)).chunks)
    except Exception:  # a damaged cache only costs a lookup; fsck reports the damage
        return frozenset()


def snapshot(top: Path, store: PackStore, writer: PackWriter | None, cache: StatCache,
             progress: Progress | None = None) -> SnapshotResult:
    """Store (or, with ``writer=None``, only hash) the folder ``top``; returns its root."""
    started = time.time_ns()
    top_s = str(top)
    top_st = os.lstat(top_s)
    dirs, skipped = _scan(top_s)
    sink = _Sink(store, writer)
    new_cache: StatCache = {}
    files: dict[bytes, _File] = {}
    to_read: list[_File] = []
    for rel, items in dirs:
        for name, st in items:
            if not stat.S_ISREG(st.st_mode):
                continue
            key = os.fsencode(f"{rel}/{name}" if rel else name)
            f = _File(key, os.path.join(top_s, rel, name), st, size=st.st_size)
            files[key] = f
            old = cache.get(key)
            if (old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
                    and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino):
                f.content, f.chunked = old.content, old.chunked
                new_cache[key] = old
            elif st.st_size == 0:
                f.content = None
            else:
                to_read.append(f)
    result = SnapshotResult(Root(ObjectId(b""), 0, 0, 0, 0), new_cache, skipped=skipped)
    if to_read:
        _read_files(to_read, store, sink, cache, progress, result)
    for f in to_read:
        st = f.st
        if st.st_mtime_ns < started - RACY_NS and st.st_ctime_ns < started - RACY_NS:
            new_cache[f.rel] = CacheEntry(f.size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                          f.content, f.chunked)
    # Trees, deepest folders first so each parent knows its children's ids.
    tree_ids: dict[str, ObjectId] = {}
    for rel, items in reversed(dirs):
        entries = []
        for name, st in items:
            child = f"{rel}/{name}" if rel else name
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(name, DIR, mode, st.st_uid, st.st_gid, st.st_mtime_ns, 0,
                                     tree_ids.pop(child)))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(os.path.join(top_s, child))
                entries.append(Entry(name, SYMLINK, mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                     0, target))
            else:
                f = files[os.fsencode(child)]
                entries.append(Entry(name, FILE, mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                     f.size, f.content, f.chunked))
        tree_ids[rel] = sink.put(KIND_TREE, Tree(tuple(entries)).encode())
    result.total_size = sum(f.size for f in files.values())
    result.unstored_trees = sink.trees
    result.root = Root(tree_ids[""], stat.S_IMODE(top_st.st_mode), top_st.st_uid, top_st.st_gid,
                       top_st.st_mtime_ns)
    return result


def _read_files(to_read: list[_File], store: PackStore, sink: _Sink, cache: StatCache,
                progress: Progress | None, result: SnapshotResult) -> None:
    """Chunk, hash and store the files in ``to_read`` on WORKERS threads."""
    jobs: list[tuple[Callable[[], int], _File | None]] = []
    small: list[_File] = []
    small_bytes = 0

    def small_job(batch: list[_File]) -> Callable[[], int]:
        def run() -> int:
            n = 0
            buf = _buffer()
            for f in batch:
                got = _read_small(f.path, buf)
                if not got:
                    f.content, f.size = None, 0
                    continue
                known = _known_chunks(store, cache.get(f.rel))
                r = chunker.chunk_small(memoryview(buf)[:got], known, sink.missing)
                f.parts = [sink.take(r)]
                n += got
            return n
        return run

    def big_job(f: _File, start: int, length: int, idx: int) -> Callable[[], int]:
        def run() -> int:
            known = _known_chunks(store, cache.get(f.rel))
            buf = _buffer()
            try:
                fd = _open_file(f.path)
            except FileNotFoundError:  # vanished since the scan: record it as empty
                return 0
            try:
                if chunker.is_paged(f.st.st_size):
                    parts = [sink.take(chunker.chunk_paged(fd, start, length, buf, known,
                                                           sink.missing))]
                else:
                    parts = [sink.take(r) for r in chunker.chunk_cdc(fd, buf, known,
                                                                     sink.missing)]
            finally:
                os.close(fd)
            f.parts[idx] = [c for p in parts for c in p]
            return sum(n for p in parts for _, n in p)
        return run

    for f in to_read:
        size = f.st.st_size
        if size <= chunker.SMALL_FILE:
            small.append(f)
            small_bytes += size
            if small_bytes >= SMALL_BATCH or len(small) >= 512:
                jobs.append((small_job(small), None))
                small, small_bytes = [], 0
        elif chunker.is_paged(size):
            n = (size + chunker.SEGMENT - 1) // chunker.SEGMENT
            f.parts = [[] for _ in range(n)]
            for i in range(n):
                seg = min(chunker.SEGMENT, size - i * chunker.SEGMENT)
                jobs.append((big_job(f, i * chunker.SEGMENT, seg, i), None))
        else:
            f.parts = [[]]
            jobs.append((big_job(f, 0, size, 0), None))
    if small:
        jobs.append((small_job(small), None))

    with ThreadPoolExecutor(WORKERS) as pool:
        window: list[Future[int]] = []
        for job, _ in jobs:
            window.append(pool.submit(job))
            if len(window) >= WORKERS * 2:
                _drain(window.pop(0), progress, result)
        for fut in window:
            _drain(fut, progress, result)
    for f in to_read:
        chunks = [c for p in f.parts for c in p]
        f.size = sum(n for _, n in chunks)
        result.files_read += 1
        if not chunks:
            f.content, f.chunked = None, False
        elif len(chunks) == 1 and chunks[0][0] != HOLE:
            f.content, f.chunked = chunks[0][0], False
        else:
            f.content = sink.put(KIND_FILELIST, FileList(
                tuple((ObjectId(c), n) for c, n in chunks)).encode())
            f.chunked = True


def _drain(fut: Future[int], progress: Progress | None, result: SnapshotResult) -> None:
    n = fut.result()
    result.bytes_read += n
    if progress:
        progress(n)


def _open_file(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _read_small(path: str, buf: bytearray) -> int:
    """Read a small file into ``buf``; a file that grew past SMALL_FILE is cut (rescanned next
    time, since its stat changed)."""
    try:
        fd = _open_file(path)
    except FileNotFoundError:  # vanished since the scan: record it as empty
        return 0
    try:
        return chunker.read_exact(fd, buf, chunker.SMALL_FILE, 0)
    finally:
        os.close(fd)


