"""btrfs through its ioctls: subvolumes, snapshots, and which byte ranges two snapshots of a
file still share.

Calls go straight to the kernel (no ``btrfs`` program, no process per call): a snapshot costs a
few milliseconds, so a fork and an exec would be most of it. The structures are those of
``linux/btrfs.h`` and ``linux/fiemap.h``.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dotmesh.errors import DotmeshError
from dotmesh.fs import _extents

# ioctl(2) on a buffer with the GIL released (fcntl.ioctl holds it): a snapshot, a subvolume's
# removal or a tree search keeps the kernel busy for milliseconds, while the commit's readers
# wait to run Python
_ioctl = _extents.ioctl

BTRFS_SUPER_MAGIC = 0x9123683E
XFS_SUPER_MAGIC = 0x58465342
FIRST_SUBVOLUME_INODE = 256  # the root folder of every subvolume has this inode number

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_VOL_ARGS = 4096  # struct btrfs_ioctl_vol_args and ..._v2 are both 4096 bytes
SUBVOL_CREATE = _ioc(_IOC_WRITE, 0x94, 14, _VOL_ARGS)
SNAP_DESTROY = _ioc(_IOC_WRITE, 0x94, 15, _VOL_ARGS)
SNAP_CREATE_V2 = _ioc(_IOC_WRITE, 0x94, 23, _VOL_ARGS)
SUBVOL_RDONLY = 1 << 1
FICLONE = _ioc(_IOC_WRITE, 0x94, 9, 4)
FICLONERANGE = _ioc(_IOC_WRITE, 0x94, 13, 32)
CLONE_RANGE = struct.Struct("=qQQQ")  # struct file_clone_range: source fd, offset, length, dest
FIEMAP = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 11, 32)
FS_IOC_GETFLAGS = _ioc(_IOC_READ, ord("f"), 1, 8)  # (the kernel reads and writes an int)
FS_IOC_SETFLAGS = _ioc(_IOC_WRITE, ord("f"), 2, 8)
FS_NOCOW_FL = 0x00800000  # chattr +C

_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQ2Q4I")
FIEMAP_FLAG_SYNC = 1
EXTENT_LAST = 0x1
# An extent whose address says nothing about its bytes: not yet placed, compressed (the
# address is that of a shared compressed run), inline in metadata, or packed with others.
_UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
_IGNORED = 0x1 | 0x1000 | 0x2000  # last, merged, shared: true of the same bytes either way
_BATCH = 4096  # extents per FIEMAP call: 11,383 extents mapped in 14.4 ms, 18.7 ms at 512

# A read-only subvolume's file extents read from its tree (root only): a quarter of FIEMAP's
# kernel time, which checks each extent for sharing (13,000 extents: 5.6 ms against 22 ms)
_SEARCH_ARGS = struct.Struct("=7Q4I4QQ")  # btrfs_ioctl_search_args_v2 less its buffer
TREE_SEARCH_V2 = _ioc(_IOC_READ | _IOC_WRITE, 0x94, 17, _SEARCH_ARGS.size)
GET_SUBVOL_INFO = _ioc(_IOC_READ, 0x94, 60, 504)
_ROOT_SUBVOL_RDONLY = 1
# struct btrfs_ioctl_get_subvol_info_args from ``generation``: generation, flags, uuid,
# parent_uuid, received_uuid, ctransid, otransid
_SUBVOL_INFO = struct.Struct("=QQ16s16s16sQQ")
_SUBVOL_INFO_AT = 280
_NO_UUID = bytes(16)
_REF_SEARCH = 64 << 10  # an item is at most a leaf (64 KiB at most): one always fits
# Above this many changed inodes, the folders are listed instead of found one inode at a
# time (14 us an inode: 100,000 changed cost 1.4-1.8 s, and then name every folder)
WHERE_LIMIT = 10_000
_INODE_REF_KEY, _INODE_EXTREF_KEY = 12, 13
_INO_LOOKUP_ARGS = 4096  # struct btrfs_ioctl_ino_lookup_args: treeid, objectid, a path
INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 0x94, 18, _INO_LOOKUP_ARGS)
# The layout of a search's results, which _extents.c reads (and the tests build)
_SEARCH_HEADER = struct.Struct("=3Q2I")  # btrfs_ioctl_search_header: transid, key, item length
_FILE_EXTENT = struct.Struct("<QQBBHB")  # btrfs_file_extent_item up to its type (21 bytes)
_DISK_EXTENT = struct.Struct("<4Q")  # the rest, if not inline: disk bytenr, length, offset, length
_REGULAR_LENGTH = _FILE_EXTENT.size + _DISK_EXTENT.size
_REGULAR_ITEM = _SEARCH_HEADER.size + _REGULAR_LENGTH
_EXTENT_DATA_KEY = 108
_SEARCH_BUFFER = 4 << 20  # at most 49,000 extent items per call
_FIRST_SEARCH = 64 << 10  # the first call's buffer, doubled per call: most files have few
_U64 = 2**64 - 1


class SnapshotError(DotmeshError):
    """A snapshot, a subvolume or a clone could not be made or removed."""

    exit_code = 15


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded


def fs_magic(path: Path | str) -> int:
    """The filesystem type (statfs's f_type) of the nearest existing folder of ``path``."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    buf = _Statfs()
    if _libc.statfs(os.fsencode(str(p)), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(p))
    return int(buf.f_type) & 0xFFFFFFFF


def on_btrfs(path: Path | str) -> bool:
    return fs_magic(path) == BTRFS_SUPER_MAGIC


def unchecksummed(fd: int) -> bool:
    """Have btrfs write the empty file ``fd`` in place, keeping no checksums of its data
    (``chattr +C``); whether it now does. For files that check their own bytes (a pack: every
    object is read back against its id). Linux 6.18 serves a direct write to a file with data
    checksums as a buffered write and a flush (the program could change its memory during
    the write, and the checksum would no longer match): a 32 MiB O_DIRECT write and fsync
    took 63-77 ms (40-60 ms of system time) there, 17-26 ms (none) to such a file."""
    flags = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        (now,) = struct.unpack_from("=I", flags)
        if not now & FS_NOCOW_FL:
            struct.pack_into("=I", flags, 0, now | FS_NOCOW_FL)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, False)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)  # (btrfs ignores it on a full file)
    except OSError:
        return False
    return bool(struct.unpack_from("=I", flags)[0] & FS_NOCOW_FL)


def is_subvolume(path: Path | str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_ino == FIRST_SUBVOLUME_INODE
            and on_btrfs(path))


def _name_arg(name: str, size: int, at: int) -> bytearray:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or len(raw) >= size - at:
        raise SnapshotError(f"bad subvolume name {name!r}")
    buf = bytearray(size)
    buf[at:at + len(raw)] = raw
    return buf


def _in_parent(path: Path, fn: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot {fn} {path}: {e.strerror}") from None


def create_subvolume(path: Path) -> None:
    """An empty subvolume at ``path`` (its parents made as needed)."""
    parent = _in_parent(path, "create subvolume")
    try:
        _ioctl(parent, SUBVOL_CREATE, _name_arg(path.name, _VOL_ARGS, 8))
    except OSError as e:
        raise SnapshotError(f"cannot create subvolume {path}: {e.strerror}") from None
    finally:
        os.close(parent)


def snapshot(source: Path, dest: Path, read_only: bool) -> None:
    """A snapshot of the subvolume ``source`` at ``dest``: shares every block, costs no copy."""
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = _in_parent(dest, "snapshot into")
        try:
            args = _name_arg(dest.name, _VOL_ARGS, 56)
            struct.pack_into("=qQQ", args, 0, src, 0, SUBVOL_RDONLY if read_only else 0)
            _ioctl(parent, SNAP_CREATE_V2, args)
        except OSError as e:
            raise SnapshotError(f"cannot snapshot {source} to {dest}: {e.strerror}") from None
        finally:
            os.close(parent)
    finally:
        os.close(src)


def destroy_subvolume(path: Path) -> None:
    """Remove a subvolume (read-only or not) with everything in it: at once where dm may
    (CAP_SYS_ADMIN, or a filesystem mounted with ``user_subvol_rm_allowed``), else as its
    owner: made writable, emptied, and removed with ``rmdir`` (Linux 4.18 and later)."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _ioctl(parent, SNAP_DESTROY, _name_arg(path.name, _VOL_ARGS, 8))
        return
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise SnapshotError(f"cannot remove subvolume {path}: {e.strerror}") from None
    finally:
        os.close(parent)
    try:
        _set_read_only(path, False)
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            remove_tree(Path(entry.path))
        os.rmdir(path)
    except OSError as e:
        raise SnapshotError(f"cannot remove subvolume {path}: {e.strerror}") from None


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it; subvolumes in it go whole, by ioctl (a
    read-only snapshot cannot be emptied file by file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if st.st_ino == FIRST_SUBVOLUME_INODE and on_btrfs(path):
        destroy_subvolume(path)
        return
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(Path(entry.path))
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def clone_file(source: int, dest: int) -> None:
    """Make ``dest`` share all of ``source``'s blocks (reflink); both are open descriptors."""
    fcntl.ioctl(dest, FICLONE, source)


Extent = tuple[int, int, int, int]  # logical, physical, length, flags


def extents(fd: int) -> list[Extent]:
    """The file's extents as the filesystem maps them (FIEMAP), in file order."""
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        _ioctl(fd, FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        body = memoryview(buf)[_FIEMAP_HEAD.size:_FIEMAP_HEAD.size + mapped * _FIEMAP_EXTENT.size]
        out.extend((e[0], e[1], e[2], e[5]) for e in _FIEMAP_EXTENT.iter_unpack(body))
        if out[-1][3] & EXTENT_LAST:
            return out
        start = out[-1][0] + out[-1][2]


def file_extents(fd: int) -> list[Extent]:
    """The extents of a file as :func:`extents` maps them, read from its subvolume's tree when
    that subvolume is read-only and this process may search trees; by FIEMAP otherwise (a
    writable file's extents are only final once flushed, which FIEMAP does)."""
    # Flushed first: final even if the subvolume was made read-only with writes still in
    # memory (a file's items are in its tree only once written out; microseconds when clean)
    return flushed_extents(fd) if _may_search and _read_only_subvolume(fd) else extents(fd)


_may_search = True  # until a search is refused: no CAP_SYS_ADMIN


def flushed_extents(fd: int) -> list[Extent]:
    """The extents of a file that may be written meanwhile, once everything written to it
    before this call is on disk: its items in its subvolume's tree after an ``fdatasync``
    (FIEMAP checks each extent for sharing: 90-110 ms for a 532 MiB database file with
    thousands of extents, against a few ms). What is written during the call may or may not
    show. FIEMAP (which flushes first too) where trees cannot be searched."""
    global _may_search
    if _may_search:
        try:
            os.fdatasync(fd)
            return _tree_extents(fd)
        except PermissionError:  # no CAP_SYS_ADMIN: FIEMAP from now on
            _may_search = False
        except (OSError, ValueError):  # not what a btrfs tree holds: FIEMAP will say
            pass
    return extents(fd)


@dataclass(frozen=True)
class Subvolume:
    """What btrfs says of a subvolume: its identity, the one it was a snapshot of (``parent``;
    zeros if none), the transaction that made it (``made``), the last one that changed
    anything in it (``changed``: a snapshot starts with its source's) and whether it is
    read-only. (The root item's generation is no such witness: taking a snapshot of a
    subvolume writes its root anew.)"""

    uuid: bytes
    parent: bytes
    made: int
    changed: int
    read_only: bool


def subvolume_of(path: Path | str) -> Subvolume | None:
    """The subvolume that holds ``path`` (None if it cannot be told: not btrfs, gone)."""
    fd = _open_folder(path)
    if fd is None:
        return None
    try:
        return _subvolume(fd)
    finally:
        os.close(fd)


def _subvolume(fd: int) -> Subvolume | None:
    """:func:`subvolume_of` the subvolume of ``fd``."""
    info = bytearray(504)
    try:
        fcntl.ioctl(fd, GET_SUBVOL_INFO, info)
    except OSError:
        return None
    _, flags, uuid, parent, _, changed, made = _SUBVOL_INFO.unpack_from(info, _SUBVOL_INFO_AT)
    return Subvolume(uuid, parent, made, changed, bool(flags & _ROOT_SUBVOL_RDONLY))


def _open_folder(path: Path | str) -> int | None:
    """A descriptor of the folder ``path`` (not followed if a symlink), or None."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


@dataclass(frozen=True)
class Changed:
    """The inodes of a snapshot that may differ from an older one (``inodes``), those of them
    that are folders (``folders``), and the snapshot (a folder in it) to find them in."""

    snapshot: Path
    inodes: frozenset[int]
    folders: frozenset[int]

    def where(self, top: Path) -> set[str] | None:
        """The folders under ``top`` (a folder of the snapshot; paths relative to it, "" for
        itself) that hold a changed inode or are a changed folder, with every folder above
        them: the only ones whose names or trees can differ. Found from each inode's names
        in the tree (its INODE_REF and INODE_EXTREF items, one search an inode) and each
        folder's path (``BTRFS_IOC_INO_LOOKUP``), not by listing folders. None if the tree
        cannot be searched."""
        paths = self._paths
        fd = None if paths is None else _open_folder(top)
        if paths is None or fd is None:
            return None
        try:
            below = _folder_path(fd, os.fstat(fd).st_ino)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        return {p[len(below):].rstrip("/") for p in paths if p.startswith(below)}

    @cached_property
    def _paths(self) -> frozenset[str] | None:
        """The paths from the subvolume's top ("a/b/", "" for the top) of the folders that
        hold or are a changed inode, and of every folder above them (worked out once for
        all the subdots of a set). None past WHERE_LIMIT changed inodes."""
        fd = None if len(self.inodes) > WHERE_LIMIT else _open_folder(self.snapshot)
        if fd is None:
            return None
        try:
            holders = set(self.folders)
            buf = bytearray(_SEARCH_ARGS.size + _REF_SEARCH)
            for ino in self.inodes:
                holders.update(_parents(fd, ino, buf))
            out: set[str] = set()
            for ino in holders:
                path = _folder_path(fd, ino)
                while path not in out:
                    out.add(path)
                    if not path:
                        break
                    path = path[:path.rstrip("/").rfind("/") + 1]
            return frozenset(out)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)


def changed_inodes(snapshot: Path, reference: Path, source: Path) -> Changed | None:
    """The inodes of the read-only snapshot holding ``snapshot`` that may differ from those
    of the read-only snapshot holding ``reference``: the inodes written after ``reference``
    was made. btrfs writes an inode's item, with the transaction's number, whenever the
    inode, its data (as each write reaches the disk) or a folder's names change, and a
    snapshot is made at the end of a transaction: a later change has a later number. The
    search skips every leaf of the tree older than that (``btrfs subvolume find-new`` does
    the same), so it costs what changed, not what the subvolume holds. Each call starts
    past the last inode the one before met, so an inode's thousands of extent items cost
    one call at most, not their leaves, and the calls run in C with the GIL let go once
    (``_extents.changed_inodes``; the 56 inodes a 1% change of a 2 GiB dot touches: 3-5 ms,
    against 25 ms for all the changed leaves' 48,000 items).

    None when the numbers cannot be compared: both must be of one line, taken of ``source``
    (the working set the snapshot was just taken of) or ``source`` made from ``reference``,
    ``reference`` unchanged since it was made, and this process allowed to search trees.
    The set may name more than changed (a read that set an access time): callers compare
    what it names."""
    global _may_search
    if not _may_search:
        return None
    new, ref, src = subvolume_of(snapshot), subvolume_of(reference), subvolume_of(source)
    if (new is None or ref is None or src is None or not new.read_only or not ref.read_only
            or ref.changed > ref.made or new.parent != src.uuid or src.uuid == _NO_UUID
            or not (ref.parent == src.uuid or src.parent == ref.uuid)
            or ref.made >= new.made):
        return None
    fd = _open_folder(snapshot)
    if fd is None:
        return None
    try:
        inodes, folders = _extents.changed_inodes(fd, ref.made)
    except PermissionError:  # no CAP_SYS_ADMIN
        _may_search = False
        return None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return Changed(snapshot, frozenset(inodes), frozenset(folders))


def _parents(fd: int, ino: int, buf: bytearray) -> set[int]:
    """The folders that hold a name of inode ``ino`` in the subvolume of ``fd``: the keys of
    its INODE_REF items, and the parents its INODE_EXTREF items name (a file with more
    names than one item holds). Each search takes microseconds: made holding the GIL
    (``fcntl.ioctl``), as one that lets it go waits to take it back after each while
    another thread runs Python (101,000 inodes: 1.4 s alone, 210 s beside one busy
    thread)."""
    out: set[int] = set()
    kind, start = _INODE_REF_KEY, 0  # the first key of the next call
    while True:
        _SEARCH_ARGS.pack_into(buf, 0, 0, ino, ino, start, _U64, 0, _U64, kind,
                               _INODE_EXTREF_KEY, 2**32 - 1, 0, 0, 0, 0, 0, _REF_SEARCH)
        fcntl.ioctl(fd, TREE_SEARCH_V2, buf)
        count = struct.unpack_from("=I", buf, 64)[0]
        if count == 0:
            return out
        pos, end = _SEARCH_ARGS.size, len(buf)
        for _ in range(count):
            if end - pos < _SEARCH_HEADER.size:
                raise ValueError("a search result runs past its buffer")
            _, objectid, offset, kind, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size
            if end - pos < length or objectid != ino:
                raise ValueError("a search result that is not this inode's")
            if kind == _INODE_REF_KEY:
                out.add(offset)
            elif kind == _INODE_EXTREF_KEY:  # parent, index (u64), name length (u16), name
                at = pos
                while at + 18 <= pos + length:
                    out.add(struct.unpack_from("<Q", buf, at)[0])
                    at += 18 + struct.unpack_from("<H", buf, at + 16)[0]
            pos += length
        if offset < _U64:
            start = offset + 1
        elif kind < _INODE_EXTREF_KEY:
            kind, start = kind + 1, 0
        else:
            return out


def _folder_path(fd: int, ino: int) -> str:
    """The path of folder ``ino`` from the top of the subvolume of ``fd``, each name followed
    by "/" ("" for the top), as ``BTRFS_IOC_INO_LOOKUP`` gives it."""
    args = bytearray(_INO_LOOKUP_ARGS)
    struct.pack_into("=QQ", args, 0, 0, ino)
    fcntl.ioctl(fd, INO_LOOKUP, args)  # as _parents
    return os.fsdecode(bytes(args[16:args.index(0, 16)]))


def _read_only_subvolume(fd: int) -> bool:
    info = _subvolume(fd)
    return info is not None and info.read_only


def _tree_extents(fd: int) -> list[Extent]:
    """The file's extent items (key: inode, EXTENT_DATA, file offset) from tree 0, which is
    the subvolume of ``fd``, in file order; holes are left out, as FIEMAP leaves them."""
    ino = os.fstat(fd).st_ino
    out: list[Extent] = []
    start, size = 0, min(_FIRST_SEARCH, _SEARCH_BUFFER)
    while True:
        buf = bytearray(_SEARCH_ARGS.size + size)
        _SEARCH_ARGS.pack_into(buf, 0, 0, ino, ino, start, _U64, 0, _U64, _EXTENT_DATA_KEY,
                               _EXTENT_DATA_KEY, 2**32 - 1, 0, 0, 0, 0, 0, size)
        _ioctl(fd, TREE_SEARCH_V2, buf)
        count = struct.unpack_from("=I", buf, 64)[0]  # key.nr_items: the items returned
        if count == 0:
            return out
        last = _add_items(memoryview(buf)[_SEARCH_ARGS.size:], count, ino, out)
        if last == _U64:
            return out
        start, size = last + 1, min(size * 2, _SEARCH_BUFFER)


def _add_items(body: memoryview, count: int, ino: int, out: list[Extent]) -> int:
    """Append ``count`` search results as extents; returns the last item's file offset.
    Compiled (``_extents.c``): with 21,000 extents, decoding them here took 20-27 ms a map."""
    got, last = _extents.items(body, count, ino)
    out.extend(got)
    return last


def _covered(ext: list[Extent]) -> Iterator[tuple[int, int]]:
    for logical, _, length, _ in ext:
        yield logical, logical + length


def changed_ranges(old: list[Extent], new: list[Extent], size: int) -> list[tuple[int, int]]:
    """The byte ranges (start, end) of ``[0, size)`` that may hold different bytes in two
    versions of a file, judged from their extent maps alone: the complement of ranges that
    map to the same disk address (a copy-on-write filesystem never rewrites a block another
    snapshot still uses) or are holes in both. Merged and sorted.

    Extents both maps hold unchanged (most of them) are set aside in C (``_extents.common``,
    a merge by offset: two maps of 21,000 in 0.6-0.7 ms, against 6-16 ms with Python's
    sets); the rest, what writes since split or replaced, is walked: the work follows the
    changes, not the map."""
    try:
        old, new, both = _extents.common(old, new)
    except ValueError:  # a map out of order (no FIEMAP or search gives one): by sets, then
        held = set(old).intersection(new)
        old, new = [e for e in old if e not in held], [e for e in new if e not in held]
        both = list(held)
    changed = [(lo, lo + n) for lo, _, n, f in both if f & _UNTRUSTED]
    same: list[tuple[int, int]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        lo, po, no, fo = old[i]
        ln, pn, nn, fn = new[j]
        start, end = max(lo, ln), min(lo + no, ln + nn)
        if (start < end and lo - po == ln - pn and not (fo | fn) & _UNTRUSTED
                and fo & ~_IGNORED == fn & ~_IGNORED):
            same.append((start, end))
        if lo + no <= ln + nn:
            i += 1
        else:
            j += 1
    # No other extent overlaps one both maps hold, and what neither map covers is a hole in
    # both: what may differ is what the other extents cover, less what they share.
    changed += _subtract(_merge([*_covered(old), *_covered(new)]), _merge(same))
    return [(a, min(b, size)) for a, b in _merge(changed) if a < size]


def same_within(old: list[Extent], new: list[Extent], ranges: list[tuple[int, int]]) -> bool:
    """Whether every byte of ``ranges`` (sorted byte ranges) is mapped, and to the same disk
    address in both maps, looking only at the extents that cover them (a few per range,
    found by bisection, not the whole maps). Stricter than :func:`changed_ranges`: an
    extent that cannot be trusted to tell (compressed, inline, not yet allocated) counts
    as a change, and so does a hole, even in both, because a hole has no address to hold
    on to: written, read and punched again, it looks the same before and after."""
    old_starts = [e[0] for e in old]
    new_starts = [e[0] for e in new]
    for lo, hi in ranges:
        mine = _pieces(old, old_starts, lo, hi)
        if mine is None or mine != _pieces(new, new_starts, lo, hi):
            return False
    return True


def _pieces(ext: list[Extent], starts: list[int], lo: int, hi: int
            ) -> list[tuple[int, int, int]] | None:
    """The parts of ``ext`` that cover [lo, hi), as (start, end, start's disk address),
    parts that continue each other on disk joined (two maps may split one run of blocks
    differently); None if any is not to be trusted or any byte is not covered (a hole)."""
    out: list[tuple[int, int, int]] = []
    at = lo  # covered up to here
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(ext) and ext[i][0] < hi:
        logical, physical, length, flags = ext[i]
        i += 1
        a, b = max(lo, logical), min(hi, logical + length)
        if a >= b:
            continue
        if flags & _UNTRUSTED or flags & ~_IGNORED or a != at:
            return None
        where = physical + (a - logical)
        if out and out[-1][2] + (a - out[-1][0]) == where:
            out[-1] = (out[-1][0], b, out[-1][2])
        else:
            out.append((a, b, where))
        at = b
    return out if at == hi else None


def shared_ranges(old: list[Extent], new: list[Extent], size: int) -> list[tuple[int, int]]:
    """The byte ranges of ``[0, size)`` that hold the same bytes in two versions of a file
    (the complement of :func:`changed_ranges`)."""
    return _subtract([(0, size)] if size > 0 else [], changed_ranges(old, new, size))


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``a`` less ``b`` (both merged and sorted)."""
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, pos = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < e:
            out.append((pos, e))
    return out


def blocks_touching(changed: list[tuple[int, int]], block: int, count: int
                    ) -> list[tuple[int, int]]:
    """The runs [first, end) of the ``count`` blocks of ``block`` bytes that overlap a range
    in ``changed`` (merged, sorted)."""
    runs: list[tuple[int, int]] = []
    for s, e in changed:
        first, end = s // block, min(-(-e // block), count)
        if first >= end:
            continue
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((first, end))
    return runs


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def unchanged_blocks(ranges: list[tuple[int, int]], block: int) -> set[int]:
    """The indexes of the ``block``-sized blocks wholly inside ``ranges`` (merged, sorted)."""
    out: set[int] = set()
    for s, e in ranges:
        first = (s + block - 1) // block
        last = e // block  # exclusive
        out.update(range(first, last))
    return out


_SUBVOL_GETFLAGS = _ioc(_IOC_READ, 0x94, 25, 8)
_SUBVOL_SETFLAGS = _ioc(_IOC_WRITE, 0x94, 26, 8)


def make_read_only(path: Path) -> None:
    """Mark the subvolume at ``path`` read-only, as a snapshot taken read-only is."""
    try:
        _set_read_only(path, True)
    except OSError as e:
        raise SnapshotError(f"cannot make {path} read-only: {e.strerror}") from None


def _set_read_only(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, _SUBVOL_GETFLAGS, flags)
        value = struct.unpack("=Q", flags)[0]
        value = value | SUBVOL_RDONLY if on else value & ~SUBVOL_RDONLY
        fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("=Q", value))
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Write the filesystem's dirty data out now, so that a snapshot taken in a freeze moments
    later has little left to write."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)
