"""Walks over trees (a subdot's folders), with no I/O of their own: trees come from a ``get``
function (an id -> the decoded :class:`Tree`, or None where it cannot be read), so the same
walk serves a local store, fsck's judging reads, a batch just received or a working state not
yet stored. Walks over commits are in :mod:`dotmesh.model.graph`.

One walker, :func:`walk_trees`, walks one tree, or two side by side (what ``new`` has that
``old`` has not, and the reverse), never entering two subtrees whose ids are equal; what it
meets it tells as :class:`Folder` (a folder, or two, entered) and :class:`Step` (a name whose
entries differ: every name of a tree walked alone). An ``enter`` hook says which folders are
entered: the caller's way to walk each tree once (``seen``), each pair once, or to refuse a
depth. :func:`reachable` is built on it: every object id beneath trees, once (a gc's mark);
so is :func:`changes`: the files that differ between two states (``dm diff``, a hub's commit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import DIR, FILE, Entry, FileList, Root, Tree

Get = Callable[[ObjectId], Tree | None]  # a tree by id; None: it cannot be read (walked empty)
Order = Literal["depth", "breadth", "path"]


@dataclass(frozen=True, slots=True)
class Folder:
    """A folder the walk enters: the tree ``new`` (None where only ``old`` has a folder
    there) beside the tree ``old`` (None in a walk of one tree, or where only ``new`` has a
    folder)."""

    path: str  # what the names in it start with: "" at the top, "a/b/" beneath
    depth: int  # 0 at the top
    new: ObjectId | None
    old: ObjectId | None


@dataclass(frozen=True, slots=True)
class Step:
    """A name of ``folder`` whose entries differ (None where a side lacks the name)."""

    folder: Folder
    name: str
    new: Entry | None
    old: Entry | None

    @property
    def path(self) -> str:
        return self.folder.path + self.name


def _folder_ref(e: Entry | None) -> ObjectId | None:
    return e.ref if e is not None and e.kind == DIR and isinstance(e.ref, bytes) else None


def _below(s: Step) -> Folder | None:
    """The folder a step leads into, if its two sides are not the same subtree."""
    new, old = _folder_ref(s.new), _folder_ref(s.old)
    if new == old:  # both None (no folder there), or one subtree
        return None
    return Folder(f"{s.folder.path}{s.name}/", s.folder.depth + 1, new, old)


def _steps(get: Get, f: Folder, by_path: bool) -> Iterator[Step]:
    """The names of a folder whose entries differ; its trees are read (``old`` first) when
    the first is asked for."""
    old = get(f.old) if f.old is not None else None
    new = get(f.new) if f.new is not None else None
    olds = old.entries if old is not None else ()
    news = new.entries if new is not None else ()
    if by_path:
        a, b = {e.name: e for e in olds}, {e.name: e for e in news}
        for name in sorted(a.keys() | b.keys()):
            x, y = a.get(name), b.get(name)
            if x != y:
                yield Step(f, name, y, x)
        return
    if not olds:
        for e in news:
            yield Step(f, e.name, e, None)
        return
    before = {e.name: e for e in olds}
    for e in news:
        o = before.pop(e.name, None)
        if o != e:
            yield Step(f, e.name, e, o)
    for o in before.values():
        yield Step(f, o.name, None, o)


def walk_trees(get: Get, new: ObjectId | None, old: ObjectId | None = None, *,
               order: Order = "depth",
               enter: Callable[[Folder], bool] | None = None) -> Iterator[Folder | Step]:
    """Walk the tree ``new`` (beside the tree ``old``, if given), iteratively (trees from
    outside may be nested deep). Yields a :class:`Folder` as it enters one, then a
    :class:`Step` for each name whose entries differ there (every name of a tree walked
    alone); where a step's sides are two different folders (or one), the walk goes into them.
    Two folders whose trees have one id are never entered, nor their names told.

    ``enter`` is asked once for each folder the walk would enter, when it would; False: it is
    not entered (nor told). Sharing a set between walks in it walks each tree once.

    A folder is yielded before its trees are read (``old`` first, by ``get``): a caller's
    ``get`` may use what it was just told (a path to name in a report). A tree ``get`` gives
    None for is walked as empty.

    ``order``:

    - ``"depth"``: a folder's steps (the names of ``new`` in its order, then the names only
      ``old`` has), then its subfolders, the last one first;
    - ``"breadth"``: the same, but subfolders nearest the top first (a queue): each tree is
      met first at the shallowest place it appears;
    - ``"path"``: names in sorted order, and a subfolder's steps right after the step that
      leads into it (a listing of changed paths, as ``dm diff`` prints)."""
    if order not in ("depth", "breadth", "path"):
        raise ValueError(f"unknown order {order!r}")
    by_path = order == "path"

    def opened(f: Folder) -> Iterator[Step] | None:
        if f.new == f.old or (enter is not None and not enter(f)):
            return None
        return _steps(get, f, by_path)

    todo: deque[Folder] = deque([Folder("", 0, new, old)])
    take = todo.popleft if order == "breadth" else todo.pop
    while todo:
        top = take()
        steps = opened(top)
        if steps is None:
            continue
        yield top
        stack = [steps]
        while stack:
            s = next(stack[-1], None)
            if s is None:
                stack.pop()
                continue
            yield s
            sub = _below(s)
            if sub is None:
                continue
            if not by_path:
                todo.append(sub)
                continue
            inner = opened(sub)
            if inner is not None:
                yield sub
                stack.append(inner)


def reachable(get: Get, file_list: Callable[[ObjectId], FileList | None],
              roots: Iterable[ObjectId], seen: set[bytes] | None = None) -> Iterator[ObjectId]:
    """Every object id beneath the trees ``roots`` once: trees, file lists, chunks (holes
    are no objects). Ids in ``seen`` are passed over with all beneath them; those yielded
    are added to it (a set shared between calls walks what they share once). A file list
    ``file_list`` gives None for is yielded, and nothing beneath it."""
    seen = set() if seen is None else seen

    def first(f: Folder) -> bool:
        assert f.new is not None  # one tree walked alone: always the new side
        if f.new in seen:
            return False
        seen.add(f.new)
        return True

    for root in roots:
        for x in walk_trees(get, root, enter=first):
            if isinstance(x, Folder):
                assert x.new is not None
                yield x.new
                continue
            e = x.new
            if e is None or e.kind != FILE or not isinstance(e.ref, bytes) or e.ref in seen:
                continue
            seen.add(e.ref)
            yield e.ref
            if not e.chunked:
                continue
            fl = file_list(e.ref)
            for c, _ in fl.chunks if fl is not None else ():
                if c != HOLE and c not in seen:
                    seen.add(c)
                    yield c


@dataclass(frozen=True)
class Change:
    subdot: str
    status: str  # added, removed, changed
    path: str
    old_size: int
    new_size: int


def changes(get: Get, old_roots: dict[str, Root],
            new_roots: dict[str, Root]) -> Iterator[Change]:
    """What differs between two states, per subdot (in name order), each by path; a folder
    that came or went is one change (``path/``) beside those of its files. Equal subtrees
    are skipped by id: the work follows the changes, and a caller may stop at any one."""
    for sub in sorted(old_roots.keys() | new_roots.keys()):
        ra, rb = old_roots.get(sub), new_roots.get(sub)
        if ra is not None and rb is not None and ra.tree == rb.tree:
            continue
        for s in walk_trees(get, rb.tree if rb else None, ra.tree if ra else None,
                            order="path"):
            if isinstance(s, Step):
                yield from _step_changes(sub, s)


def _step_changes(sub: str, s: Step) -> Iterator[Change]:
    x, y, path = s.old, s.new, s.path
    xd = x is not None and x.kind == DIR
    yd = y is not None and y.kind == DIR
    if xd or yd:  # the walk goes into the folders if they differ
        if x is not None and not xd:
            yield Change(sub, "removed", path, x.size, 0)
        if y is not None and not yd:
            yield Change(sub, "added", path, 0, y.size)
        if xd and not yd:
            yield Change(sub, "removed", path + "/", 0, 0)
        if yd and not xd:
            yield Change(sub, "added", path + "/", 0, 0)
    elif x is None and y is not None:
        yield Change(sub, "added", path, 0, y.size)
    elif y is None and x is not None:
        yield Change(sub, "removed", path, x.size, 0)
    elif x is not None and y is not None and (
            (x.kind, x.ref, x.size, x.mode) != (y.kind, y.ref, y.size, y.mode)):
        yield Change(sub, "changed", path, x.size, y.size)


__all__ = ["Change", "Folder", "Get", "Order", "Step", "changes", "reachable", "walk_trees"]
