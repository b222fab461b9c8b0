"""Properties of the commit-graph walks that push, pull and the hub rely on, over random
commit DAGs whose trees share, change, move and merge files the way real histories do.

The objects are the real encodings (Commit, Root, Tree/Entry, FileList), held in a dict by id;
each property is checked against a plain reference computed from the same dict.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dotmesh.model.graph import ancestors, commits_between
from dotmesh.model.ids import HOLE, object_id
from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    SYMLINK,
    Commit,
    Entry,
    FileList,
    Root,
    Tree,
)
from dotmesh.remote.graph import delta, discover
from dotmesh.remote.wire import Record

SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RANK = {KIND_CHUNK: 0, KIND_FILELIST: 1, KIND_TREE: 2, KIND_COMMIT: 3}
NAMES = ["a", "b", "c", "d"]  # few names: edits land on paths that exist
SUBDOTS = ["db", "files"]
# Chunk contents: distinct bytes of distinct lengths, so one id has one length.
CHUNKS = [bytes([65 + i]) * (i + 1) for i in range(12)]

# A tree in plain form: name -> ("f", content) | ("d", tree) | ("l", target), where content is
# None (an empty file), ("c", i) (one chunk) or ("L", (i or -1 for a hole, ...)) (a file list).
# Folders are tuples of sorted items so that they can be shared and compared.
PTree = tuple[tuple[str, tuple[object, ...]], ...]


class Choices:
    """Decisions read from bytes Hypothesis draws: each ``pick(n)`` is one byte modulo ``n``,
    0 once the bytes run out. One draw of bytes is far cheaper than hundreds of small draws,
    and Hypothesis still shrinks it towards zeros, that is towards the simplest history."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.at = raw, 0

    def pick(self, n: int) -> int:
        if self.at >= len(self.raw):
            return 0
        self.at += 1
        return self.raw[self.at - 1] % n

    def one(self, among: list):
        return among[self.pick(len(among))]


def _list(c: Choices) -> tuple[str, tuple[int, ...]]:
    return ("L", tuple(c.pick(len(CHUNKS) + 1) - 1 for _ in range(1 + c.pick(4))))


def _content(c: Choices) -> object:
    kind = c.pick(4)
    if kind <= 1:  # a file list, half the time: what deltas and their bases are about
        return _list(c)
    return ("c", c.pick(len(CHUNKS))) if kind == 2 else None


def _node(c: Choices) -> tuple[object, ...]:
    kind = c.pick(6)
    if kind == 4:
        return (SYMLINK, c.one(["a", "b/c"]))
    if kind == 5:
        return (DIR, _tree(c))
    return (FILE, _content(c))


def _nodes(tree: PTree, at: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[object, ...]]:
    """Every path in ``tree`` (a tuple of names) and what is there."""
    out: dict[tuple[str, ...], tuple[object, ...]] = {}
    for name, node in tree:
        out[(*at, name)] = node
        if node[0] == DIR:
            out.update(_nodes(node[1], (*at, name)))
    return out


def _put(tree: PTree, path: tuple[str, ...], node: tuple[object, ...] | None) -> PTree:
    """``tree`` with ``node`` at ``path`` (None: removed); the folders beside it kept."""
    items = dict(tree)
    if len(path) > 1:
        sub = items.get(path[0])
        items[path[0]] = (DIR, _put(sub[1] if sub and sub[0] == DIR else (), path[1:], node))
    elif node is None:
        items.pop(path[0], None)
    else:
        items[path[0]] = node
    return tuple(sorted(items.items()))


def _tree(c: Choices, most: int = 8) -> PTree:
    """Up to ``most`` files, links and folders put at paths up to three folders deep."""
    tree: PTree = ()
    for _ in range(c.pick(most + 1)):
        path = tuple(c.one(NAMES) for _ in range(1 + c.pick(3)))
        tree = _put(tree, path, _node(c) if c.pick(4) else (DIR, ()))
    return tree


def _edited(c: Choices, tree: PTree) -> PTree:
    """``tree`` with one to three changes, each at a path it has or a new name in one of its
    folders: a file rewritten (a file list replaced by another: a delta's base), something
    dropped, added, or copied from elsewhere in the tree. The rest is kept, ids shared."""
    for _ in range(1 + c.pick(3)):
        nodes = _nodes(tree)
        files = sorted(p for p, n in nodes.items() if n[0] == FILE)
        folders = [()] + sorted(p for p, n in nodes.items() if n[0] == DIR)
        what = c.one(["rewrite", "drop", "new", "copy"])
        if what == "rewrite" and files:
            path = c.one(files)
            old = nodes[path][1]
            if isinstance(old, tuple) and old[0] == "L" and c.pick(2):  # one block changed
                blocks = list(old[1])
                blocks[c.pick(len(blocks))] = c.pick(len(CHUNKS) + 1) - 1
                tree = _put(tree, path, (FILE, ("L", tuple(blocks))))
            elif isinstance(old, tuple) and old[0] == "c" and c.pick(2):  # grows a block
                tree = _put(tree, path, (FILE, ("L", (old[1], c.pick(len(CHUNKS))))))
            else:
                tree = _put(tree, path, (FILE, _list(c)))
            continue
        if what == "drop" and nodes:
            tree = _put(tree, c.one(sorted(nodes)), None)
            continue
        where = (*c.one(folders), c.one(NAMES))
        if what == "copy" and nodes and len(nodes) < 40:
            source = c.one(sorted(nodes))
            if where[:len(source)] != source:  # not into itself
                tree = _put(tree, where, nodes[source])
                continue
        tree = _put(tree, where, _node(c))
    return tree


History = list[tuple[tuple[int, ...], dict[str, PTree]]]


def _history(raw: bytes) -> History:
    """Commits in creation order, each as (indices of its parents, subdot -> tree): a root
    commit or a few, then commits that edit their first parent's trees (mostly the commit
    just before: chains, with some branches) and, for merges, take whole folders from the
    other parents."""
    c = Choices(raw)
    out: History = []
    for i in range(1 + c.pick(12)):
        if i == 0 or c.pick(8) == 7:
            subs = c.one([["db"], ["files"], ["db", "files"]])
            out.append(((), {s: _tree(c) for s in subs}))
            continue
        first = i - 1 - c.pick(4) % i
        others = [c.pick(i) for _ in range(c.one([0, 0, 1, 2]))]
        parents = tuple(dict.fromkeys((first, *others)))
        subs = dict(out[parents[0]][1])
        for other in parents[1:]:
            for s, t in out[other][1].items():
                mine = dict(subs.get(s, ()))
                for name, child in t:
                    if c.pick(2):
                        mine[name] = child
                subs[s] = tuple(sorted(mine.items()))
        for s in SUBDOTS:
            choice = c.one(["edit", "keep", "edit", "drop", "fresh"])
            if choice == "keep" or (choice == "edit" and s not in subs and c.pick(2)):
                continue
            if choice == "drop":
                subs.pop(s, None)
            elif choice == "fresh":
                subs[s] = _tree(c)
            else:
                subs[s] = _edited(c, subs.get(s, ()))
        out.append((parents, subs))
    return out


def histories() -> st.SearchStrategy[History]:
    return st.binary(min_size=256, max_size=2048).map(_history)


class Graph:
    """Encoded objects by id, with each object's kind and the ids it names."""

    def __init__(self) -> None:
        self.objects: dict[bytes, bytes] = {}
        self.kind: dict[bytes, int] = {}
        self.names: dict[bytes, tuple[bytes, ...]] = {}
        self.commits: list[bytes] = []

    def put(self, data: bytes, kind: int, names: Iterable[bytes] = ()) -> bytes:
        oid = object_id(data)
        self.objects[oid] = data
        self.kind[oid] = kind
        self.names[oid] = tuple(dict.fromkeys(names))
        return oid

    def get(self, oid: bytes) -> bytes:
        return self.objects[oid]

    def chunk(self, i: int) -> bytes:
        return self.put(CHUNKS[i], KIND_CHUNK)

    def tree(self, tree: PTree) -> bytes:
        entries = []
        for name, (kind, what) in tree:
            if kind == DIR:
                entries.append(Entry(name, DIR, 0o755, 0, 0, 1, 0, self.tree(what)))
            elif kind == SYMLINK:
                entries.append(Entry(name, SYMLINK, 0o777, 0, 0, 1, 0, what))
            elif what is None:
                entries.append(Entry(name, FILE, 0o644, 0, 0, 1, 0, None))
            elif what[0] == "c":
                ref = self.chunk(what[1])
                entries.append(Entry(name, FILE, 0o644, 0, 0, 1, len(CHUNKS[what[1]]), ref))
            else:
                parts = [(HOLE, 4096) if i < 0 else (self.chunk(i), len(CHUNKS[i]))
                         for i in what[1]]
                fl = FileList(tuple(parts))
                ref = self.put(fl.encode(), KIND_FILELIST, (c for c, _ in parts if c != HOLE))
                entries.append(Entry(name, FILE, 0o644, 0, 0, 1, fl.size, ref, True))
        return self.put(Tree(tuple(entries)).encode(), KIND_TREE,
                        (e.ref for e in entries if e.kind != SYMLINK and e.ref is not None))

    def commit(self, parents: tuple[bytes, ...], subs: dict[str, PTree], n: int) -> bytes:
        roots = {s: Root(self.tree(t), 0o700, 0, 0, 1) for s, t in subs.items()}
        data = Commit(parents, roots, f"commit {n}", "tester", n).encode()
        oid = self.put(data, KIND_COMMIT, [*parents, *(r.tree for r in roots.values())])
        self.commits.append(oid)
        return oid

    # ---- references, from the ``names`` edges alone

    def parents(self, c: bytes) -> tuple[bytes, ...]:
        return Commit.decode(self.objects[c]).parents

    def reachable_commits(self, heads: Iterable[bytes], within=lambda _: True) -> set[bytes]:
        seen: set[bytes] = set()
        todo = [h for h in heads if within(h)]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(p for p in self.parents(c) if within(p))
        return seen

    def closure(self, ids: Iterable[bytes]) -> set[bytes]:
        """Every object ``ids`` name, themselves included (commits: their whole history)."""
        seen: set[bytes] = set()
        todo = list(ids)
        while todo:
            o = todo.pop()
            if o not in seen:
                seen.add(o)
                todo.extend(self.names[o])
        return seen

    def flat(self, tree: bytes | None, at: str = "") -> dict[str, tuple[str, object, bool]]:
        """path -> (kind, ref, chunked) for everything beneath ``tree``, folders included."""
        out: dict[str, tuple[str, object, bool]] = {}
        if tree is None:
            return out
        for e in Tree.decode(self.objects[tree]).entries:
            path = f"{at}/{e.name}"
            out[path] = (e.kind, e.ref, e.chunked)
            if e.kind == DIR:
                out.update(self.flat(e.ref, path))
        return out

    def added(self, c: bytes) -> tuple[set[bytes], dict[bytes, set[bytes]]]:
        """What commit ``c`` adds over its first parent, path by path: each folder, file list
        or chunk that differs from what the parent has at the same path, and of a changed
        file list, the chunks the parent's file at that path lacks. And for each changed file
        list, the parent's file lists at the same paths (the bases a delta may use)."""
        commit = Commit.decode(self.objects[c])
        base = Commit.decode(self.objects[commit.parents[0]]).subdots if commit.parents else {}
        out = {c}
        bases: dict[bytes, set[bytes]] = {}
        for sub, root in commit.subdots.items():
            old_root = base[sub].tree if sub in base else None
            if root.tree == old_root:
                continue
            out.add(root.tree)
            old = self.flat(old_root)
            for path, (kind, ref, chunked) in self.flat(root.tree).items():
                was = old.get(path)
                if kind == DIR:
                    if was is None or was[:2] != (DIR, ref):
                        out.add(ref)
                elif kind == FILE and ref is not None:
                    if was is not None and was[:2] == (FILE, ref):
                        continue
                    out.add(ref)
                    if chunked:
                        known = set()
                        if was is not None and was[0] == FILE and was[1] is not None:
                            known = set(self.names[was[1]]) if was[2] else {was[1]}
                            if was[2]:
                                bases.setdefault(ref, set()).add(was[1])
                        out.update(set(self.names[ref]) - known)
        return out, bases


def build(history: History) -> Graph:
    g = Graph()
    for n, (parents, subs) in enumerate(history):
        g.commit(tuple(g.commits[p] for p in parents), subs, n)
    return g


def _pick(draw: st.DrawFn, g: Graph, most: int = 3) -> list[bytes]:
    return draw(st.lists(st.sampled_from(g.commits), max_size=most, unique=True))


# ------------------------------------------------------------------ ancestors


@SETTINGS
@given(histories(), st.data())
def test_ancestors_is_what_the_present_commits_reach(history, data):
    g = build(history)
    heads = _pick(data.draw, g)
    assert ancestors(g.get, heads, lambda _: True) == g.reachable_commits(heads)
    assert ancestors(g.get, heads, lambda _: False) == set()
    present = set(_pick(data.draw, g, len(g.commits)))
    # Only through present commits: a missing one hides its parents.
    assert ancestors(g.get, heads, present.__contains__) == \
        g.reachable_commits(heads, present.__contains__)


# ------------------------------------------------------------------ commits_between


def _check_order(g: Graph, order: list[bytes]) -> None:
    assert len(order) == len(set(order)), "a commit listed twice"
    where = {c: i for i, c in enumerate(order)}
    for c in order:
        for p in g.parents(c):
            if p in where:
                assert where[p] < where[c], "a child before its parent"


@SETTINGS
@given(histories(), st.data())
def test_commits_between_a_head_and_a_stop_set(history, data):
    """Parents before children, each commit once. With ``stop`` closed under parents, as
    the callers pass it (what the remote's heads reach; the hub's verified commits): exactly
    the head's ancestors outside it. With any ``stop``: the walk does not pass through it,
    so it lists what the head reaches by paths that avoid ``stop`` (a superset of the head's
    ancestors that nothing in ``stop`` reaches)."""
    g = build(history)
    head = data.draw(st.sampled_from(g.commits))
    picked = set(_pick(data.draw, g))
    closed = g.reachable_commits(picked)
    order = commits_between(g.get, head, closed)
    assert set(order) == g.reachable_commits([head]) - closed
    _check_order(g, order)

    order = commits_between(g.get, head, picked)
    assert set(order) == g.reachable_commits([head], lambda c: c not in picked)
    assert set(order) >= g.reachable_commits([head]) - closed
    _check_order(g, order)


# ------------------------------------------------------------------ delta


@pytest.mark.slow
@SETTINGS
@given(histories(), st.data())
def test_delta_is_what_each_commit_changes_over_its_first_parent(history, data):
    g = build(history)
    commits = data.draw(st.one_of(st.just(g.commits), st.lists(
        st.sampled_from(g.commits), min_size=1, max_size=4, unique=True)))
    d = delta(g.get, commits)
    want: set[bytes] = set()
    bases: dict[bytes, set[bytes]] = {}
    for c in commits:
        objects, more = g.added(c)
        want |= objects
        for new, olds in more.items():
            bases.setdefault(new, set()).update(olds)
    assert set(d.kinds) == want
    assert all(d.kinds[o] == g.kind[o] for o in d.kinds)
    # Never an object the commits do not hold; never a commit they did not name.
    assert set(d.kinds) <= g.closure(commits)
    assert {o for o in d.kinds if g.kind[o] == KIND_COMMIT} == set(commits)
    # ordered(): by kind, chunks, file lists, trees, commits; so each object comes after
    # those of other kinds it names (folders before their subfolders).
    order = d.ordered()
    assert sorted(order) == sorted(d.kinds)
    ranks = [RANK[d.kinds[o]] for o in order]
    assert ranks == sorted(ranks)
    # bases: for each changed file list, the first parent's list at the same path.
    assert set(d.bases) == set(bases)
    assert all(d.bases[new] in olds for new, olds in bases.items())
    # A commit with its first parent's trees adds nothing but itself.
    parent = commits[0]
    subs = Commit.decode(g.objects[parent]).subdots
    raw = Commit((parent, *commits[1:2]), subs, "same", "tester", 10**6).encode()
    same = g.put(raw, KIND_COMMIT, [parent, *(r.tree for r in subs.values())])
    assert set(delta(g.get, [same]).kinds) == {same}


@SETTINGS
@given(histories(), st.data())
def test_what_is_sent_completes_what_the_receiver_has(history, data):
    """Push (_send): delta(commits_between(head, what the remote's heads reach)), added to
    the closure of those heads, is the whole closure of ``head``, and no more; its commits
    come after the parents sent with them. The hub (set_ref) checks the same against the
    commits it verified: with any stop set whose closures are held, nothing is lacking."""
    g = build(history)
    head = data.draw(st.sampled_from(g.commits))
    remote_heads = _pick(data.draw, g)
    known = ancestors(g.get, remote_heads, lambda _: True)
    d = delta(g.get, commits_between(g.get, head, known))
    sent = set(d.kinds)
    assert sent | g.closure(remote_heads) >= g.closure([head])
    assert sent <= g.closure([head])
    commits = [o for o in d.ordered() if d.kinds[o] == KIND_COMMIT]
    assert set(commits) == g.reachable_commits([head]) - known
    _check_order(g, commits)

    stop = set(remote_heads)
    sent = set(delta(g.get, commits_between(g.get, head, stop)).kinds)
    assert sent | g.closure(stop) >= g.closure([head])


def test_delta_of_a_file_that_grows_or_changes_a_block():
    """The cases random histories meet least: a one-block file that grows into a file list
    keeping its block, and a file list with one block changed (a delta's base). Only the new
    block and the new list are added, with the parent's list as the base."""
    grown = [((), {"db": (("f", (FILE, ("c", 0))),)}),
             ((0,), {"db": (("f", (FILE, ("L", (0, 1)))),)}),
             ((1,), {"db": (("f", (FILE, ("L", (0, 2)))),)})]
    g = build(grown)
    small, big, bigger = g.commits
    one_block, old_block, new_block = (object_id(CHUNKS[i]) for i in range(3))
    d = delta(g.get, [big])
    tree = Commit.decode(g.objects[big]).subdots["db"].tree
    (entry,) = Tree.decode(g.objects[tree]).entries
    assert set(d.kinds) == {big, tree, entry.ref, old_block}  # not one_block: the parent's
    assert d.bases == {}  # the parent's file is no list
    d = delta(g.get, [bigger])
    tree = Commit.decode(g.objects[bigger]).subdots["db"].tree
    (after,) = Tree.decode(g.objects[tree]).entries
    assert set(d.kinds) == {bigger, tree, after.ref, new_block}
    assert d.bases == {after.ref: entry.ref}
    assert set(delta(g.get, [small, big, bigger]).kinds) == g.closure([bigger])
    assert one_block in g.closure([small])



# ------------------------------------------------------------------ discover


@pytest.mark.slow
@SETTINGS
@given(histories(), st.data(), st.integers(1, 3))
def test_discover_finds_exactly_what_the_receiver_lacks(history, data, batch):
    g = build(history)
    want = data.draw(st.lists(st.sampled_from(g.commits), min_size=1, max_size=3))
    roots = [r.tree for c in want for r in Commit.decode(g.objects[c]).subdots.values()]
    # The receiver holds whole closures of some trees and file lists (a tree or list it
    # holds comes with all it names), and some loose chunks (from a fetch cut short).
    holdable = [o for o, k in g.kind.items() if k in (KIND_TREE, KIND_FILELIST)]
    held = g.closure(data.draw(st.lists(st.sampled_from(holdable), max_size=4))
                     if holdable else [])
    chunks = [o for o, k in g.kind.items() if k == KIND_CHUNK]
    held |= set(data.draw(st.lists(st.sampled_from(chunks), max_size=3))) if chunks else set()

    asked: list[bytes] = []
    kept: list[bytes] = []

    def lacking(ids: list[bytes]) -> set[bytes]:
        return {i for i in ids if i not in held}

    def fetch(wanted: dict[bytes, int]):
        for oid, kind in wanted.items():
            assert g.kind[oid] == kind
        asked.extend(wanted)
        ids = list(wanted)
        for i in range(0, len(ids), 2):  # answers of two records each
            yield [Record(g.kind[o], o, len(g.objects[o]), g.objects[o], False)
                   for o in ids[i:i + 2]]

    def keep(records: list[Record]) -> None:
        kept.extend(r.oid for r in records)

    found = discover(roots, lacking, fetch, keep, batch=batch)
    need = g.closure(roots) - held
    by_kind = {k: {o for o in need if g.kind[o] == k}
               for k in (KIND_TREE, KIND_FILELIST, KIND_CHUNK)}
    assert len(found.trees) == len(set(found.trees))
    assert len(found.lists) == len(set(found.lists))
    assert set(found.trees) == by_kind[KIND_TREE]
    assert set(found.lists) == by_kind[KIND_FILELIST]
    assert found.chunks == {c: len(g.objects[c]) for c in by_kind[KIND_CHUNK]}
    # Each tree and list fetched once, none the receiver has; all handed to keep.
    assert len(asked) == len(set(asked))
    assert set(asked) == by_kind[KIND_TREE] | by_kind[KIND_FILELIST]
    assert sorted(kept) == sorted(asked)
