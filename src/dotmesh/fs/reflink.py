"""Copies that share blocks (reflinks, ``FICLONE``) on filesystems without subvolumes: XFS made
with ``reflink=1``, and btrfs folders that are not subvolumes. A tree copy costs a few system
calls per file and no data, so it is the snapshot of such a filesystem."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dotmesh.fs import btrfs
from dotmesh.fs.btrfs import CLONE_RANGE, FICLONE, FICLONERANGE, SnapshotError

Stats = dict[bytes, os.stat_result]  # relative path -> stat, of the files copied

# A file whose times are this close to a copy's start may have been written in the same clock
# tick as its stat was taken: its copy is made again rather than trusted (see refresh_tree).
RACY_NS = 100_000_000
# A changed file at least this big is brought up to date range by range (two extent maps and a
# clone per changed range) rather than cloned whole: a clone costs what the file's extent map
# holds, and a database file rewritten page by page holds thousands (XFS, 532 MiB, 10,000
# extents, 300 pages rewritten: 90-110 ms against 180-510 ms).
RANGED_MIN = 1 << 20
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def supported(folder: Path) -> bool:
    """Can files in ``folder`` (which must exist) be reflinked?"""
    probe = folder / f".dm-reflink-{uuid.uuid4().hex}"
    try:
        a = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.write(a, b"x" * 4096)
        b = os.open(f"{probe}.2", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(b, FICLONE, a)
            return True
        except OSError:
            return False
        finally:
            os.close(b)
            os.unlink(f"{probe}.2")
    finally:
        os.close(a)
        os.unlink(probe)


def copy_tree(source: Path, dest: Path, into: bool = False) -> tuple[Stats, Stats]:
    """Copy ``source`` to ``dest`` (which must not exist; with ``into``, an empty folder
    that does, e.g. a new subvolume): folders, symlinks, and files as
    reflinks, with modes, owners and times. Returns the stats of the files copied, in the
    source when they were copied and in the copy (sockets, FIFOs and devices are not copied:
    dm stores none)."""
    before: Stats = {}
    after: Stats = {}
    with _trees(source, dest, make=not into) as (src_fd, dst_fd):
        _copy_dir(src_fd, dst_fd, b"", before, after, None)
    return before, after


Same = Callable[[bytes, os.stat_result], bool]


@dataclass(frozen=True)
class Earlier:
    """A read-only copy made earlier of the same tree (a kept state), whose files a new
    read-only copy shares as hard links where ``same`` says the source's file is, by its
    stat, the one copied there: a link costs a third of a clone (XFS: 12.5 against 38 µs a
    file). Nothing may then write those files in place (see :func:`refresh_tree`)."""

    root: Path
    same: Same


def copy_tree_sharing(source: Path, dest: Path, earlier: Earlier
                      ) -> tuple[Stats, Stats, set[bytes]]:
    """:func:`copy_tree` (``dest`` must not exist), sharing files with ``earlier``; also
    returns the files shared (the copy's links)."""
    before: Stats = {}
    after: Stats = {}
    linked: set[bytes] = set()
    try:
        old = os.open(earlier.root, _DIR)
    except OSError:
        before, after = copy_tree(source, dest)
        return before, after, linked
    try:
        with _trees(source, dest, make=True) as (src_fd, dst_fd):
            _copy_dir(src_fd, dst_fd, b"", before, after, (old, earlier.same, linked))
    finally:
        os.close(old)
    return before, after, linked


@contextmanager
def _trees(source: Path, dest: Path, make: bool = False) -> Iterator[tuple[int, int]]:
    """Descriptors of the folders ``source`` and ``dest`` (made first if ``make``) for the
    block, which copies one into the other; ``dest`` then gets ``source``'s attributes. A
    failure is one SnapshotError naming both."""
    try:
        src_fd = os.open(source, _DIR)
    except OSError as e:
        raise SnapshotError(f"cannot copy {source}: {e.strerror}") from None
    try:
        if make:
            os.mkdir(dest, 0o700)
        dst_fd = os.open(dest, _DIR)
        try:
            yield src_fd, dst_fd
            _attrs(dst_fd, os.fstat(src_fd))
        finally:
            os.close(dst_fd)
    except OSError as e:
        raise SnapshotError(f"cannot copy {source} to {dest}: {e.strerror}") from None
    finally:
        os.close(src_fd)


def refresh_tree(source: Path, dest: Path, before: Stats, started_ns: int,
                 maps: Maps | None = None, linked: Collection[bytes] = ()) -> Stats:
    """Bring ``dest``, a :func:`copy_tree` of ``source`` begun at ``started_ns`` whose source
    stats were ``before``, up to date: only files whose stat changed since (or that were
    written too close to that copy to tell) are cloned again, big ones only where they
    changed (``maps``: the copy's extent maps, from :func:`map_copies`, each used once; a
    file in ``linked`` is shared with an earlier copy, so it is replaced, never patched); new
    entries are copied, vanished ones removed. A commit copies the tree before its freeze
    and only this in it. Returns the stats of the source's files as the copy now holds them."""
    out: Stats = {}
    with _trees(source, dest) as (src_fd, dst_fd):
        _refresh_dir(src_fd, dst_fd, b"", before, out, started_ns - RACY_NS,
                     {} if maps is None else maps, linked)
    return out


Maps = dict[bytes, list[btrfs.Extent]]  # a copy's big files' extent maps, by relative path


def map_copies(dest: Path, stats: Stats) -> Maps:
    """The extent maps of the big files of ``dest``, a copy whose files' stats are
    ``stats``, for :func:`refresh_tree`: made before a freeze, they need not be made in it
    (28 ms each for 10,000 extents on XFS)."""
    maps: Maps = {}
    for rel, st in stats.items():
        if st.st_size < RANGED_MIN:
            continue
        try:
            fd = os.open(os.path.join(dest, os.fsdecode(rel)), _FLAGS)
        except OSError:
            continue
        try:
            maps[rel] = btrfs.extents(fd)
        except OSError:
            pass  # made in the freeze, then, or the file is cloned whole
        finally:
            os.close(fd)
    return maps


def _refresh_dir(src: int, dst: int, prefix: bytes, before: Stats, out: Stats,
                 trusted_before: int, maps: Maps, linked: Collection[bytes]) -> None:
    with os.scandir(src) as it:
        entries = {e.name: e.stat(follow_symlinks=False) for e in it}
    with os.scandir(dst) as it:
        have = {e.name: _kind(e) for e in it}  # kinds only: a stat of the copy's files
    # would be a third of the walk. Remove what the source no longer has (or has as another kind).
    for name, kind in have.items():
        wanted = entries.get(name)
        if wanted is None or stat.S_IFMT(wanted.st_mode) != kind or kind == stat.S_IFLNK:
            _remove_at(dst, name, kind)
    for name, st in entries.items():
        rel = prefix + os.fsencode(name)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            old = before.get(rel)
            copy = have.get(name)
            if (copy == stat.S_IFREG and old is not None
                    and (old.st_size, old.st_mtime_ns, old.st_ctime_ns, old.st_ino)
                    == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                    and st.st_mtime_ns < trusted_before and st.st_ctime_ns < trusted_before):
                out[rel] = old
                continue
            copy_map = maps.pop(rel, None)  # the copy changes now: its map is spent
            if copy == stat.S_IFREG:
                if old is not None and old.st_ino == st.st_ino and st.st_size >= RANGED_MIN \
                        and rel not in linked:
                    try:
                        now = _refresh_ranges(src, dst, name, copy_map)
                        if now is not None:
                            out[rel] = now
                        continue
                    except OSError:  # no extent map or ranged clone here: cloned whole
                        pass
                os.unlink(name, dir_fd=dst)
            _clone_file(src, dst, name, rel, out, {})
        elif stat.S_ISDIR(mode):
            try:
                s = os.open(name, _DIR, dir_fd=src)
            except FileNotFoundError:
                continue
            try:
                if have.get(name) != stat.S_IFDIR:
                    os.mkdir(name, 0o700, dir_fd=dst)
                d = os.open(name, _DIR, dir_fd=dst)
                try:
                    _refresh_dir(s, d, rel + b"/", before, out, trusted_before, maps, linked)
                    _attrs(d, os.fstat(s))
                finally:
                    os.close(d)
            finally:
                os.close(s)
        elif stat.S_ISLNK(mode):
            _copy_link(src, dst, name, st)


def _kind(entry: os.DirEntry[str]) -> int:
    """An entry's kind (``S_IFDIR``, ...) from its directory entry, stat only if it has none."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def _remove_at(dst: int, name: str, kind: int) -> None:
    if kind == stat.S_IFDIR:
        shutil.rmtree(name, dir_fd=dst)
    else:
        os.unlink(name, dir_fd=dst)


def _clone_file(src: int, dst: int, name: str, rel: bytes, before: Stats, after: Stats
                ) -> None:
    try:
        s = os.open(name, _FLAGS, dir_fd=src)
    except FileNotFoundError:
        return
    try:
        d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                    dir_fd=dst)
        try:
            fcntl.ioctl(d, FICLONE, s)
            now = os.fstat(s)
            _attrs(d, now)
            before[rel], after[rel] = now, os.fstat(d)
        finally:
            os.close(d)
    finally:
        os.close(s)


def _refresh_ranges(src: int, dst: int, name: str, copy_map: list[btrfs.Extent] | None
                    ) -> os.stat_result | None:
    """Bring the copy ``name`` in ``dst`` up to date with the file in ``src`` it was cloned
    from, by cloning again only the ranges whose blocks the two no longer share (a block
    both map cannot have been written since: it would have been copied first). Returns the
    source's stat as copied, None if it is gone (and so is the copy). ``copy_map``: the
    copy's extent map if known (nothing writes the copy but this). An OSError: the
    filesystem cannot say or do it, or the file was written meanwhile (a writer the freeze
    did not stop: a whole clone is one instant of the file, ranges cloned one by one are
    not)."""
    try:
        s = os.open(name, _FLAGS, dir_fd=src)
    except FileNotFoundError:
        os.unlink(name, dir_fd=dst)  # gone since the listing: so is its copy
        return None
    try:
        d = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst)
        try:
            first = os.fstat(s)
            new = btrfs.extents(s)  # flushes the source: its map is final
            old = btrfs.extents(d) if copy_map is None else copy_map
            size, have = first.st_size, os.fstat(d).st_size
            common = min(size, have)
            changed = btrfs.changed_ranges(old, new, common)
            if size > common:
                changed.append((common, size))
            if have != size:
                os.ftruncate(d, size)
            block = os.fstatvfs(d).f_bsize
            for start, end in _aligned(changed, block, size):
                fcntl.ioctl(d, FICLONERANGE, CLONE_RANGE.pack(s, start, end - start, start))
            now = os.fstat(s)
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
                    first.st_size, first.st_mtime_ns, first.st_ctime_ns):
                raise OSError(errno.EAGAIN, f"{name} was written during its refresh")
            _attrs(d, now)
            return now
        finally:
            os.close(d)
    finally:
        os.close(s)


def _aligned(ranges: list[tuple[int, int]], block: int, size: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted) widened to whole blocks, the last ending at ``size`` at most (a
    clone may end mid-block only at the source's end), and merged."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        start, end = start // block * block, min(size, -(-end // block) * block)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif start < end:
            out.append((start, end))
    return out


def _copy_link(src: int, dst: int, name: str, st: os.stat_result) -> None:
    try:
        target = os.readlink(name, dir_fd=src)
    except FileNotFoundError:
        return
    os.symlink(target, name, dir_fd=dst)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)


_Sharing = tuple[int, Same, set[bytes]]  # the earlier copy's folder, the test, the links made


def _copy_dir(src: int, dst: int, prefix: bytes, before: Stats, after: Stats,
              sharing: _Sharing | None) -> None:
    with os.scandir(src) as it:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    for name, st in entries:
        rel = prefix + os.fsencode(name)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if sharing is not None and sharing[1](rel, st) \
                    and _link_file(sharing[0], dst, name, rel, st, after):
                before[rel] = st
                sharing[2].add(rel)
                continue
            _clone_file(src, dst, name, rel, before, after)
        elif stat.S_ISDIR(mode):
            try:
                s = os.open(name, _DIR, dir_fd=src)
            except FileNotFoundError:
                continue
            try:
                os.mkdir(name, 0o700, dir_fd=dst)
                d = os.open(name, _DIR, dir_fd=dst)
                inner: _Sharing | None = None
                if sharing is not None:
                    try:
                        inner = (os.open(name, _DIR, dir_fd=sharing[0]), sharing[1], sharing[2])
                    except OSError:  # the earlier copy has no such folder: nothing to share
                        pass
                try:
                    _copy_dir(s, d, rel + b"/", before, after, inner)
                    _attrs(d, os.fstat(s))
                finally:
                    os.close(d)
                    if inner is not None:
                        os.close(inner[0])
            finally:
                os.close(s)
        elif stat.S_ISLNK(mode):
            _copy_link(src, dst, name, st)


def _link_file(old: int, dst: int, name: str, rel: bytes, st: os.stat_result,
               after: Stats) -> bool:
    """Link the earlier copy's file ``name`` into ``dst`` if it is a regular file of the
    source's size (the test said its bytes are the source's); False to clone instead."""
    try:
        was = os.lstat(name, dir_fd=old)
        if not stat.S_ISREG(was.st_mode) or was.st_size != st.st_size:
            return False
        os.link(name, name, src_dir_fd=old, dst_dir_fd=dst, follow_symlinks=False)
    except OSError:
        return False
    after[rel] = was
    return True


def _attrs(fd: int, st: os.stat_result) -> None:
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
