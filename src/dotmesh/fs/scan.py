"""A folder's entries with their lstat, as plain tuples: the unit of a commit's walk.

The listing is compiled (``_scan.c``): it reads a whole folder with the GIL released, so a
walk lists the next folders on a thread while it compares the last one with the stat cache,
and it makes no ``os.stat_result`` (19 fields, float times) per file. :func:`match` does the
comparison's per-file work in C too, for the files the cache vouches for. A no-change commit
of 200,000 files is this walk and little else.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from dotmesh.fs._scan import match
from dotmesh.fs._scan import scan as _scan

# (name, mode, inode, links, uid, gid, size, mtime_ns, ctime_ns): Lstat's layout, unnamed,
# so that a listing of 1,000 files is built in C and unpacked in one statement.
Entry = tuple[str, int, int, int, int, int, int, int, int]


class Lstat(NamedTuple):
    """An :data:`Entry` with names, for the few places that keep one (files to be read)."""

    name: str
    st_mode: int
    st_ino: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int


def listing(path: str, nofollow: bool = True) -> tuple[Entry | None, list[Entry]]:
    """The folder ``path``'s own stat (taken before its entries: a change made to it while it
    is listed shows in its ctime; its name is "") and its entries with their lstat, in
    directory order. Entries that vanish while it is listed are left out, and a folder that is
    gone, or is not a folder any more, is (None, []) (a running app removes files; a live
    commit's freeze pass sees the final state). ``nofollow``: a symlink at ``path`` counts as
    not a folder, so a folder swapped for a link during a walk never leads it outside. Other
    errors (permissions, a symlink loop) raise OSError."""
    try:
        return _scan(path, nofollow)
    except (FileNotFoundError, NotADirectoryError):
        return None, []


def entry(name: str, st: os.stat_result) -> Entry:
    """The :data:`Entry` of an ``os.lstat`` result."""
    return (name, st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


__all__ = ["Entry", "Lstat", "entry", "listing", "match"]
