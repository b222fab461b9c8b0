"""The one tree walker (model/trees.py): its orders, its hook, and, over the random histories
of test_graph_properties, that a side-by-side walk reports exactly the differences a naive
walk of both whole trees finds, and that a walk sharing ``seen`` visits each id once."""

from __future__ import annotations

import pytest
from hypothesis import given

from dotmesh.model.ids import HOLE, object_id
from dotmesh.model.objects import DIR, FILE, Commit, Entry, FileList, Tree
from dotmesh.model.trees import Folder, Step, reachable, walk_trees
from tests.unit.test_graph_properties import SETTINGS, Graph, build, histories


class Store:
    def __init__(self) -> None:
        self.trees: dict[bytes, bytes] = {}
        self.reads: list[bytes] = []

    def tree(self, *entries: Entry) -> bytes:
        data = Tree(tuple(sorted(entries, key=lambda e: e.name))).encode()
        self.trees[object_id(data)] = data
        return object_id(data)

    def get(self, oid: bytes) -> Tree:
        self.reads.append(oid)
        return Tree.decode(self.trees[oid])


def f(name: str, size: int = 1) -> Entry:
    return Entry(name, FILE, 0o644, 0, 0, 1, size, object_id(bytes(size)) if size else None)


def d(name: str, tree: bytes) -> Entry:
    return Entry(name, DIR, 0o755, 0, 0, 1, 0, tree)


def told(walk) -> list[str]:
    return [f"{x.path}" if isinstance(x, Folder) else
            f"{x.path}{'+' if x.new else ''}{'-' if x.old else ''}" for x in walk]


def test_orders_of_one_tree():
    s = Store()
    c = s.tree(f("z"))
    top = s.tree(d("a", s.tree(d("b", c), f("y"))), d("c", c), f("x"))
    assert told(walk_trees(s.get, top)) == [
        "", "a+", "c+", "x+", "c/", "c/z+", "a/", "a/b+", "a/y+", "a/b/", "a/b/z+"]
    assert told(walk_trees(s.get, top, order="breadth")) == [
        "", "a+", "c+", "x+", "a/", "a/b+", "a/y+", "c/", "c/z+", "a/b/", "a/b/z+"]
    assert told(walk_trees(s.get, top, order="path")) == [
        "", "a+", "a/", "a/b+", "a/b/", "a/b/z+", "a/y+", "c+", "c/", "c/z+", "x+"]
    with pytest.raises(ValueError):
        list(walk_trees(s.get, top, order="sideways"))  # type: ignore[arg-type]


def test_two_trees_side_by_side_skip_what_is_equal():
    s = Store()
    same = s.tree(f("deep"))
    old = s.tree(d("keep", same), d("gone", s.tree(f("g"))), f("file", 1), f("mod", 1),
                 f("was-file"))
    new = s.tree(d("keep", same), f("file", 1), f("mod", 2), d("was-file", s.tree(f("n"))),
                 f("new"))
    s.reads.clear()
    assert told(walk_trees(s.get, new, old, order="path")) == [
        "", "gone-", "gone/", "gone/g-", "mod+-", "new+", "was-file+-", "was-file/",
        "was-file/n+"]
    assert same not in s.reads  # an equal subtree is never read
    assert s.reads[:2] == [old, new]  # old first
    assert list(walk_trees(s.get, new, new)) == []
    # Only what the new side has: the hook refuses folders only the old side has.
    got = told(walk_trees(s.get, new, old, enter=lambda x: x.new is not None))
    assert got == ["", "mod+-", "new+", "was-file+-", "gone-", "was-file/", "was-file/n+"]


def test_the_hook_and_unreadable_trees():
    s = Store()
    shared = s.tree(f("x"))
    top = s.tree(d("a", shared), d("b", shared), d("c", b"\x01" * 32))
    seen: set[bytes] = set()

    def once(x: Folder) -> bool:
        if x.new in seen:
            return False
        seen.add(x.new)  # type: ignore[arg-type]
        return True

    def get(oid: bytes) -> Tree | None:
        return s.get(oid) if oid in s.trees else None  # None: walked as empty

    assert told(walk_trees(get, top, enter=once)) == [
        "", "a+", "b+", "c+", "c/", "b/", "b/x+"]
    assert told(walk_trees(get, top, enter=once)) == []  # all seen


def _roots(g: Graph, c: bytes) -> dict[str, bytes]:
    return {s: r.tree for s, r in Commit.decode(g.objects[c]).subdots.items()}


def _flat(g: Graph, tree: bytes | None, at: str = "") -> dict[str, Entry]:
    """Every entry beneath ``tree`` by path, the naive way: every folder read, at each place."""
    out: dict[str, Entry] = {}
    if tree is None:
        return out
    for e in Tree.decode(g.objects[tree]).entries:
        out[at + e.name] = e
        if e.kind == DIR:
            assert isinstance(e.ref, bytes)
            out.update(_flat(g, e.ref, f"{at}{e.name}/"))
    return out


def _get(g: Graph):
    return lambda oid: Tree.decode(g.objects[oid])


@pytest.mark.slow
@SETTINGS
@given(histories())
def test_side_by_side_reports_what_a_naive_walk_finds(history):
    g = build(history)
    for old_c, new_c in zip(g.commits, g.commits[1:] + g.commits[:1], strict=True):
        olds, news = _roots(g, old_c), _roots(g, new_c)
        for sub in olds.keys() | news.keys():
            a, b = _flat(g, olds.get(sub)), _flat(g, news.get(sub))
            naive = {p: (b.get(p), a.get(p)) for p in a.keys() | b.keys() if a.get(p) != b.get(p)}
            for order in ("depth", "breadth", "path"):
                steps = [x for x in walk_trees(_get(g), news.get(sub), olds.get(sub),
                                               order=order) if isinstance(x, Step)]
                assert {x.path: (x.new, x.old) for x in steps} == naive
                assert len(steps) == len(naive)  # each difference once
                if order == "path":
                    paths = [x.path for x in steps]
                    assert paths == sorted(paths, key=lambda p: p.split("/"))


@SETTINGS
@given(histories())
def test_a_shared_seen_visits_each_reachable_id_once(history):
    g = build(history)
    seen: set[bytes] = set()
    got: list[bytes] = []
    trees = [t for c in g.commits for t in _roots(g, c).values()]
    for c in g.commits:
        got += reachable(_get(g), lambda o: FileList.decode(g.objects[o]),
                         _roots(g, c).values(), seen)
    assert len(got) == len(set(got))
    assert set(got) == g.closure(trees) - {HOLE}
    assert set(got) == seen
    # One tree walked alone with no hook: every folder at each place it appears.
    for t in trees[:3]:
        places = sum(1 for e in _flat(g, t).values() if e.kind == DIR) + 1
        assert sum(isinstance(x, Folder) for x in walk_trees(_get(g), t)) == places
