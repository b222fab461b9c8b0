"""Walks over the commit graph, with no I/O of their own: commits come from a ``get``
function (an id -> the commit's encoded bytes; NotFound if absent), so the same walks serve a
local store, a batch just received, a hub's storage or a bucket.

One walker, :func:`walk_commits`, visits each commit once; the others are built on it:
:func:`ancestors`, :func:`commits_between`, and the one fast-forward rule, :func:`descends`
(a branch moves without force only to a commit that includes its head), with
:func:`check_fast_forward`, its refusal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Literal

from dotmesh.errors import Conflict, NotFound
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import Commit

Get = Callable[[ObjectId], bytes]  # a commit's encoded bytes by id; raises NotFound
Order = Literal["depth", "breadth", "parents-first"]
DESCENT_LIMIT = 1_000_000  # commits a fast-forward check reads before it says no


def walk_commits(get: Get, heads: Iterable[ObjectId], *,
                 stop: Callable[[ObjectId], bool] | None = None, order: Order = "depth",
                 first_parent: bool = False, limit: int | None = None,
                 missing_ok: bool = False) -> Iterator[ObjectId]:
    """Each commit reachable from ``heads`` once, in ``order``:

    - ``"depth"``: each commit before its parents, depth first (a stack: the last head and
      the last parent are followed first);
    - ``"breadth"``: nearest first (a queue: heads in order, then their parents in order);
    - ``"parents-first"``: each commit after those of its parents that are walked (ready to
      be sent or stored in that order).

    A commit ``stop`` says True of is neither visited nor gone past (``stop`` is asked once
    per commit, on its first meeting). ``first_parent``: follow first parents only.
    ``limit``: the walk ends, quietly, after visiting that many commits (a bound on reads;
    in ``"parents-first"`` order what was yielded is still closed under parents).
    ``missing_ok``: a commit ``get`` raises NotFound for is walked as if it had no parents
    (else the NotFound goes to the caller).

    In ``"depth"`` and ``"breadth"`` order a commit is yielded before it is read: a caller
    that stops on it (a commit it looks for, a bound of its own) causes no read of it, and a
    caller whose ``get`` counts what it reads sees, at each commit, what came before it."""
    seen: set[ObjectId] = set()
    todo: deque[tuple[ObjectId, bool]] = deque((h, False) for h in heads)
    take = todo.popleft if order == "breadth" else todo.pop
    after = order == "parents-first"
    if not after and order not in ("depth", "breadth"):
        raise ValueError(f"unknown order {order!r}")
    while todo:
        c, finished = take()
        if finished:
            yield c
            continue
        if c in seen or (stop is not None and stop(c)):
            continue
        if limit is not None and len(seen) >= limit:
            return
        seen.add(c)
        if not after:
            yield c
            if limit is not None and len(seen) >= limit:
                return
        try:
            parents = Commit.decode(get(c)).parents
        except NotFound:
            if not missing_ok:
                raise
            parents = ()
        if after:
            todo.append((c, True))
        todo.extend((p, False) for p in (parents[:1] if first_parent else parents))


def ancestors(get: Get, heads: Iterable[ObjectId],
              have: Callable[[ObjectId], bool]) -> set[ObjectId]:
    """Every commit reachable from ``heads`` through commits ``have`` says are present."""
    return set(walk_commits(get, heads, stop=lambda c: not have(c)))


def commits_between(get: Get, head: ObjectId, stop: Container[ObjectId]) -> list[ObjectId]:
    """Commits reachable from ``head`` and not from ``stop`` (closed under parents), parents
    before children."""
    return list(walk_commits(get, [head], stop=stop.__contains__, order="parents-first"))


def descends(get: Get, new: ObjectId, old: ObjectId, limit: int = DESCENT_LIMIT) -> bool:
    """Whether ``new`` includes ``old`` (is it, or a descendant of it): the fast-forward
    rule. False too when ``old`` is not among the first ``limit`` commits walked from
    ``new``. ``old`` itself is never read."""
    return any(c == old for c in walk_commits(get, [new], limit=limit))


def check_fast_forward(get: Get, new: ObjectId, old: ObjectId, where: str,
                       limit: int = DESCENT_LIMIT) -> None:
    """Conflict unless moving ``where`` (a branch, as messages name it) from ``old`` to
    ``new`` is a fast-forward: the refusal of every remote, worded once."""
    if not descends(get, new, old, limit):
        raise Conflict(f"{where} has commits that {new.hex()[:12]} does not include (not a "
                       "fast-forward): pull first, or push --force")


__all__ = ["DESCENT_LIMIT", "Get", "Order", "ancestors", "check_fast_forward", "commits_between",
           "descends", "walk_commits"]
