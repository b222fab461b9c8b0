"""The commit walks (model/graph.py): one walker, and what is built on it."""

from __future__ import annotations

import pytest

from dotmesh.errors import Conflict, NotFound
from dotmesh.model.graph import (
    ancestors,
    check_fast_forward,
    commits_between,
    descends,
    walk_commits,
)
from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import Commit


class Store:
    """Commits by id, counting reads."""

    def __init__(self) -> None:
        self.data: dict[ObjectId, bytes] = {}
        self.reads: list[ObjectId] = []

    def add(self, *parents: ObjectId) -> ObjectId:
        data = Commit(tuple(parents), {}, f"c{len(self.data)}", "t", len(self.data)).encode()
        oid = object_id(data)
        self.data[oid] = data
        return oid

    def get(self, oid: ObjectId) -> bytes:
        self.reads.append(oid)
        if oid not in self.data:
            raise NotFound(f"no commit {oid.hex()[:12]}")
        return self.data[oid]


@pytest.fixture
def dag():
    """root <- a <- b <- m, and root <- x <- m (m's parents: b, then x)."""
    s = Store()
    root = s.add()
    a = s.add(root)
    b = s.add(a)
    x = s.add(root)
    m = s.add(b, x)
    return s, root, a, b, x, m


def test_orders(dag):
    s, root, a, b, x, m = dag
    assert list(walk_commits(s.get, [m])) == [m, x, root, b, a]  # last parent first
    assert list(walk_commits(s.get, [m], order="breadth")) == [m, b, x, a, root]
    assert list(walk_commits(s.get, [m], order="parents-first")) == [root, x, a, b, m]
    assert list(walk_commits(s.get, [m], first_parent=True)) == [m, b, a, root]
    with pytest.raises(ValueError):
        list(walk_commits(s.get, [m], order="sideways"))  # type: ignore[arg-type]


def test_each_commit_once_and_stop(dag):
    s, root, a, b, x, m = dag
    assert sorted(walk_commits(s.get, [m, b, m])) == sorted([m, b, a, x, root])
    assert s.reads.count(root) == 1
    assert set(walk_commits(s.get, [m], stop={a}.__contains__)) == {m, b, x, root}
    assert list(walk_commits(s.get, [m], stop={m}.__contains__)) == []


def test_a_commit_is_yielded_before_it_is_read(dag):
    s, root, a, b, x, m = dag
    walk = walk_commits(s.get, [m], order="breadth")
    assert next(walk) == m and s.reads == []
    assert next(walk) == b and s.reads == [m]


def test_limit_bounds_reads(dag):
    s, root, a, b, x, m = dag
    assert list(walk_commits(s.get, [m], order="breadth", limit=2)) == [m, b]
    assert s.reads == [m]  # the last one visited is not read
    assert list(walk_commits(s.get, [m], limit=0)) == []
    s.reads.clear()
    got = list(walk_commits(s.get, [m], order="parents-first", limit=3))
    assert got == [root, x] and len(s.reads) == 3  # m, x, root read; what came is closed


def test_missing_commits(dag):
    s, root, a, b, x, m = dag
    del s.data[a]
    with pytest.raises(NotFound):
        list(walk_commits(s.get, [m]))
    assert set(walk_commits(s.get, [m], missing_ok=True)) == {m, b, a, x, root}


def test_ancestors_and_commits_between(dag):
    s, root, a, b, x, m = dag
    assert ancestors(s.get, [m], lambda c: c != x) == {m, b, a, root}
    assert ancestors(s.get, [x], lambda c: c != x) == set()
    assert commits_between(s.get, m, {a}) == [root, x, b, m]
    assert commits_between(s.get, b, {b}) == []


def test_descends_is_the_fast_forward_rule(dag):
    s, root, a, b, x, m = dag
    assert descends(s.get, m, a) and descends(s.get, m, m) and descends(s.get, b, root)
    assert not descends(s.get, b, x)  # sideways
    assert not descends(s.get, a, b)  # backwards
    assert not descends(s.get, m, a, limit=4)  # a is fifth: past the bound (m, x, root, b)
    assert descends(s.get, m, a, limit=5)
    s.reads.clear()
    assert descends(s.get, m, b)
    assert b not in s.reads  # the old head itself is never read
    check_fast_forward(s.get, m, x, "here")
    with pytest.raises(Conflict, match=r"^here has commits that [0-9a-f]{12} does not include "
                                       r"\(not a fast-forward\): pull first, or push --force$"):
        check_fast_forward(s.get, a, x, "here")
