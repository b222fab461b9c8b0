"""``dm push``, ``dm pull`` and ``dm clone``: share a dot's commits through a remote.

Push sends what its commits add to what the remote's heads already hold (found by diffing
trees locally, then asking the remote which of those objects it lacks), in the order chunks,
file lists, trees, commits, in batches; then moves the remote branch by compare-and-swap.
Pull fetches the commits it lacks, then the trees and file lists it lacks level by level,
then the chunks, in batches that are made durable as they come (a rerun fetches only what
is still missing); only when everything is verified and stored does a ref move. A fetched
tree whose symlinks would point out of the subdot is refused before anything names it.

Tags travel with their dot: a push sends every tag of the dot (and the commits they name)
after the branch, a pull and a clone take the remote's tags whose names are free here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import zstandard

from dotmesh.capture.containers import start as start_containers
from dotmesh.capture.containers import stop as stop_containers
from dotmesh.capture.stop import Stopped, pinned_containers, stop_processes
from dotmesh.capture.writers import find_writers
from dotmesh.errors import AlreadyExists, Conflict, NotFound, UsageError
from dotmesh.meta import config, refs
from dotmesh.meta.db import Tx
from dotmesh.model.graph import ancestors, check_fast_forward, commits_between
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import DEFAULT_BRANCH, MAX_NAME, check_branch, check_name
from dotmesh.model.objects import (
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    Commit,
    FileList,
    Tree,
    is_dirty,
)
from dotmesh.model.tags import Tag
from dotmesh.ops import checkout as checkout_ops
from dotmesh.ops import remotes
from dotmesh.remote import graph
from dotmesh.remote.transport import Transport
from dotmesh.remote.wire import KIND_FILELIST_DELTA, BadTransfer, Record, batches, encode_delta
from dotmesh.store.repo import Journal, Repo
from dotmesh.workdir.branches import backend_of, materialize, recover

Progress = Callable[[int], None]
CHUNK_FETCH = 2000  # chunks asked for at once (the answer comes in parts of a few MiB)
CHUNK_BYTES = 24 << 20  # and no more than this many bytes of them, as their lists say
MAX_FETCHED_COMMITS = 1_000_000  # of one pull or clone
IN_FLIGHT = 2  # batches under way at once, each way


@dataclass
class Transfer:
    """What a push, pull or clone did."""

    remote: str
    remote_dot: str
    branch: str
    old: ObjectId | None  # the branch's head before (on the remote for a push)
    new: ObjectId | None
    status: str = ""  # pushed, up to date, fast-forward, created, ahead, cloned
    objects: int = 0  # sent or fetched
    bytes: int = 0  # stored bytes sent or fetched (what crossed the wire, less headers)
    restored: checkout_ops.ResetResult | None = None  # a pull into the checked-out branch
    tags: list[str] = field(default_factory=list)  # sent, or taken from the remote
    dot: str = ""  # the local dot (a clone's new one)
    notes: list[str] = field(default_factory=list)  # tags left as they were, and why
    stashed: str | None = None  # --stash-on-divergence: the new branch holding the state
    # that diverged (local for a pull, on the remote for a push)


def _track(home: Repo, dot: str, remote: str, remote_dot: str, branch: str,
           head: ObjectId | None) -> None:
    with Tx(home.conn) as c:
        refs.track(c, dot, remote, remote_dot, branch, head)


P = ParamSpec("P")
T = TypeVar("T")


def _sharing_store(command: str) -> Callable[[Callable[Concatenate[Repo, P], T]],
                                             Callable[Concatenate[Repo, P], T]]:
    """Run the verb holding the store lock shared, as a dot's lock does: what a transfer
    indexes before any ref names it (a fetch's objects), and the objects a push reads, are
    never swept or moved by a gc, which holds it exclusively (docs/format.md)."""
    def wrap(f: Callable[Concatenate[Repo, P], T]) -> Callable[Concatenate[Repo, P], T]:
        def run(home: Repo, /, *args: P.args, **kwargs: P.kwargs) -> T:
            with home.store_lock(command, exclusive=False):
                return f(home, *args, **kwargs)
        run.__doc__, run.__name__ = f.__doc__, f.__name__
        return run
    return wrap


# ------------------------------------------------------------------ push


@_sharing_store("push")
def push(home: Repo, dot: str, remote_name: str | None = None, branch: str | None = None,
         remote_dot: str | None = None, force: bool = False,
         progress: Progress | None = None, total: Progress | None = None,
         with_tags: bool = True, stash_on_divergence: bool = False) -> Transfer:
    """Send ``branch`` and the dot's tags. When the remote's branch has commits ours lacks,
    refuse (``force`` replaces them); with ``stash_on_divergence``, the remote's head is
    first kept on a new branch there (``stash/BRANCH-ID``, as Dotmesh's receiving side
    did) and then the branch moves to ours: nothing is lost on either side."""
    home.require_dot(dot)
    r = remotes.get(home, remote_name)
    if r.anonymous:
        raise UsageError(f"remote {r.name} has no key: it reads public dots but pushes "
                         f"nothing (add the hub as USER@HOST with an API key to push)")
    rdot = remotes.remote_dot_for(home, r, dot, remote_dot)
    branch = check_branch(branch or home.branch(dot))
    head = home.head(dot, branch)
    if head is None:
        raise NotFound(f"branch {branch} of {dot} has no commits to push: dm commit first")
    t = remotes.transport(home, r, rdot)
    try:
        heads = t.heads()
        old = heads.get(branch)
        res = Transfer(r.name, rdot, branch, old if old else None, head, dot=dot)
        mine = home.tags(dot) if with_tags else {}
        theirs = t.tags() if mine else {}
        tags = _tags_to_send(mine, theirs, force, f"{r.name}'s {rdot}")
        diverged = False
        if old != head and old is not None and not force:
            try:  # the rule the remote enforces again when the ref moves
                check_fast_forward(home.packs.get, head, old, branch)
            except Conflict:  # worded for this command: which remote, what to run
                if not stash_on_divergence:
                    raise Conflict(f"{r.name}'s {rdot} has commits on {branch} that yours "
                                   f"lacks: dm pull {r.name} first, dm push --force to "
                                   "replace them, or dm push --stash-on-divergence to "
                                   "keep them on a new branch there") from None
                diverged = True
        wanted = ([head] if old != head else []) + [tag.commit for tag, _ in tags]
        if wanted:
            _send(home, t, wanted, [*heads.values(), *(x.commit for x in theirs.values())],
                  res, progress, total)
        res.status = "up to date"
        if diverged and old is not None:  # the remote holds old: only a ref is made there
            taken: dict[str, ObjectId | None] = {n: None for n in theirs or t.tags()}
            res.stashed, there = _stash_name(branch, old, {**taken, **heads})
            if not there:
                t.set_ref(res.stashed, None, old, False)
        if old != head:  # compare-and-swap: a push meanwhile fails this, stash or not
            t.set_ref(branch, old, head, force or diverged)
            res.status = "pushed"
        for tag, was in tags:  # after the branch: a tag is an extra, the branch the point
            t.set_tag(tag, was)
            res.tags.append(tag.name)
        _track(home, dot, r.name, rdot, branch, head)
        return res
    finally:
        t.close()


def _tags_to_send(mine: dict[str, Tag], theirs: dict[str, Tag], force: bool,
                  where: str) -> list[tuple[Tag, ObjectId | None]]:
    """(tag, the commit the remote's tag of that name names) of each tag the remote lacks
    or (with force) has at another commit. Without force, a tag there naming another commit
    refuses the push before anything is sent."""
    out: list[tuple[Tag, ObjectId | None]] = []
    for name, tag in sorted(mine.items()):
        there = theirs.get(name)
        if there is not None and there.commit == tag.commit:
            continue
        if there is not None and not force:
            raise Conflict(f"{where} has a tag {name} naming commit "
                           f"{there.commit.hex()[:12]}, yours names "
                           f"{tag.commit.hex()[:12]}: dm push --force moves it, --no-tags "
                           "pushes the branch alone")
        out.append((tag, there.commit if there else None))
    return out


def _ancestry(home: Repo, head: ObjectId) -> set[ObjectId]:
    return ancestors(home.packs.get, [head], home.packs.has)


def _send(home: Repo, t: Transport, wanted: list[ObjectId], remote_heads: list[ObjectId],
          res: Transfer, progress: Progress | None, total: Progress | None) -> None:
    """Send what the commits ``wanted`` (a branch's head, tags' commits) and their history
    add to what ``remote_heads`` hold."""
    get = home.packs.get
    known = ancestors(get, remote_heads, home.packs.has)
    fresh: list[ObjectId] = []
    for head in wanted:  # each list parents first, after the commits the ones before named
        more = commits_between(get, head, known)
        known.update(more)
        fresh += more
    d = graph.delta(get, fresh)
    ids = d.ordered()
    lack = t.lacking(ids)
    todo = [o for o in ids if o in lack]  # read from this store's objects
    locs = home.packs.locate_many(todo)
    if total:
        total(sum(loc.stored_len for loc in locs.values()))
    cctx = zstandard.ZstdCompressor(level=1)

    def records() -> Iterator[Record]:
        """What to send, read from the packs as it goes: chunks, file lists, trees, commits."""
        for kind in (KIND_CHUNK, KIND_FILELIST, KIND_TREE, KIND_COMMIT):
            phase = [o for o in todo if d.kinds[o] == kind]
            for oid, loc, payload in home.packs.stored(phase):
                # a bucket keeps what it is sent: a damaged disk must not turn into a
                # damaged backup (a hub hashes each object itself; a 2 GiB first push
                # took 22 s, and 28 s checking here too)
                if not t.checks_objects:
                    home.packs.check_stored(oid, loc, payload)
                base = d.bases.get(oid)
                if kind == KIND_FILELIST and t.can_delta and base and base not in lack:
                    delta = encode_delta(base, FileList.decode(get(base)),
                                         FileList.decode(get(oid)))
                    packed = cctx.compress(delta)
                    if len(packed) < len(payload):
                        yield Record(KIND_FILELIST_DELTA, oid, len(delta), packed, True)
                        continue
                yield Record(loc.kind, oid, loc.raw_len, payload, loc.zstd)

    def send(batch: list[Record]) -> None:
        t.send(batch)
        sent = sum(len(r.payload) for r in batch)
        res.objects += len(batch)
        res.bytes += sent
        if progress:
            progress(sent)

    # Two batches in flight: the next one is read and sent while the remote stores the last.
    # (Their order does not matter: the remote checks completeness only when the ref moves.)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        flying: deque[Future[None]] = deque()
        for batch in batches(records()):
            flying.append(pool.submit(send, batch))
            if len(flying) >= IN_FLIGHT:
                flying.popleft().result()
        for f in flying:
            f.result()


# ------------------------------------------------------------------ fetching


def fetch(home: Repo, t: Transport, head: ObjectId, have: Sequence[ObjectId],
          progress: Progress | None = None) -> tuple[int, int]:
    """Bring ``head`` and everything it needs into the store, verified; returns how many
    objects and stored bytes were fetched. ``have``: local heads, where the remote may stop
    sending history.

    Chunks are indexed batch by batch as they come (a rerun does not fetch them again);
    commits, trees and file lists are written aside as they come (memory holds their ids,
    not them) and indexed last, after every check passed, lists before trees before commits:
    a tree in the index always comes with all it names."""
    if home.packs.has(head):
        return 0, 0  # a commit in the store comes with all it names
    counted = [0, 0]

    def note(records: list[Record]) -> None:
        n = sum(len(r.payload) for r in records)
        counted[0] += len(records)
        counted[1] += n
        if progress:
            progress(n)

    aside = {kind: home.packs.writer() for kind in (KIND_FILELIST, KIND_TREE, KIND_COMMIT)}

    def keep(records: list[Record]) -> None:
        note(records)
        for kind, writer in aside.items():
            writer.add_many([(r.kind, r.oid, r.raw_len, r.payload, r.zstd)
                             for r in records if r.kind == kind])  # verified by decode

    commits: set[ObjectId] = set()
    roots: dict[tuple[str, ObjectId], None] = {}  # (subdot, tree) of every commit fetched
    frontier = [head]
    while frontier:
        want = frontier.pop()
        if want in commits or home.packs.has(want):
            continue
        got = t.history(want, have)
        fresh = [r for r in got
                 if r.oid not in commits and not home.packs.has(r.oid)]
        keep(fresh)
        for rec in fresh:
            commits.add(rec.oid)
            if len(commits) > MAX_FETCHED_COMMITS:
                raise BadTransfer(f"{t.where} sent over {MAX_FETCHED_COMMITS} commits at "
                                  "once; nothing was changed")
            c = Commit.decode(rec.raw())
            roots.update(((sub, r.tree), None) for sub, r in c.subdots.items())
            frontier.extend(p for p in c.parents if p not in commits and not home.packs.has(p))

    found = graph.discover((tree for _, tree in roots), home.packs.missing, t.fetch_iter, keep)

    def get(oid: ObjectId) -> bytes:
        for writer in aside.values():
            data = writer.read_pending(oid)
            if data is not None:
                return data
        return home.packs.get(oid)

    check = graph.SymlinkCheck(get)
    for sub, tree in roots:
        bad = check.check_root(tree, sub)
        if bad:
            raise BadTransfer(f"{t.where} sent a tree whose symlink {bad} points out of "
                              "its subdot; nothing was changed")
    _check_sizes(home, found, get, t.where)
    writer = home.packs.writer()
    # Asked for, and so written, in the order their lists name them: a file's blocks then
    # lie back to back in the packs, and a restore reads them in runs. In id order (as
    # before), every block was a read of its own: a checkout of a 2 GiB clone took 14.7 s
    # against 4.9 s in the store it was cloned from.
    todo = list(found.chunks)
    parts: list[dict[ObjectId, int]] = [{}]
    size = 0
    for cid in todo:  # parts of a bounded size: an answer holds what its lists said, no more
        if len(parts[-1]) >= CHUNK_FETCH or size + found.chunks[cid] > CHUNK_BYTES:
            parts.append({})
            size = 0
        parts[-1][cid] = KIND_CHUNK
        size += found.chunks[cid]

    def fetch_part(part: dict[ObjectId, int]) -> list[Record]:
        got: list[Record] = []
        for answer in t.fetch_iter(part):
            for r in answer:
                if r.raw_len != found.chunks[r.oid]:
                    raise BadTransfer(f"{t.where} sent block {r.oid.hex()[:16]} of "
                                      f"{r.raw_len} bytes where its list says "
                                      f"{found.chunks[r.oid]}; nothing was changed")
            got.extend(answer)
        return got

    with ThreadPoolExecutor(IN_FLIGHT) as pool:  # the next part comes while one is stored
        flying: deque[Future[list[Record]]] = deque()
        for i in range(len(parts) + IN_FLIGHT):
            if i < len(parts) and parts[i]:
                flying.append(pool.submit(fetch_part, parts[i]))
            if len(flying) >= IN_FLIGHT or (i >= len(parts) and flying):
                got = flying.popleft().result()
                note(got)
                writer.add_many([(r.kind, r.oid, r.raw_len, r.payload, r.zstd)
                                 for r in got])  # verified by decode
                writer.flush()  # durable now: a rerun does not fetch these again
    writer.flush()
    aside[KIND_FILELIST].flush()
    aside[KIND_TREE].flush()
    with Tx(home.conn) as tx:  # before the commits land: what came from outside is known
        refs.mark_fetched(tx, commits)
    aside[KIND_COMMIT].flush()
    return counted[0], counted[1]


def _check_sizes(home: Repo, found: graph.Discovered, get: graph.Get,
                 where: str) -> None:
    """Every file's size is what its content has, before anything names it (a tree saying
    1 TiB for 28 bytes would make a 1 TiB file). Blocks sent are checked against their
    lists as they come; blocks held already, here, all at once (a pull of a 1% change to a
    2 GiB dot names 200,000 of them: 1.7 s one by one). Objects are read back one at a
    time."""
    # each row checked whole, as locate does: a damaged one stops the fetch here, before
    # anything is written
    lengths = home.packs.raw_lengths(found.held)
    if lengths != found.held:  # (compared in C; which block, only when one differs)
        c, n = next((c, n) for c, n in found.held.items() if lengths.get(c) != n)
        raise BadTransfer(f"{where} sent a tree or file list whose block {c.hex()[:16]} "
                          f"is not {n} bytes long here; nothing was changed")
    for tid in found.trees:
        for e in Tree.decode(get(tid)).entries:
            if e.kind != FILE or not isinstance(e.ref, bytes) or not e.chunked:
                continue  # a single chunk's length, checked above or as it comes
            real = FileList.decode(get(e.ref)).size
            if real != e.size:
                raise BadTransfer(f"{where} sent tree {tid.hex()[:16]} whose file "
                                  f"{e.name[:80]!r} says {e.size} bytes where its content "
                                  f"has {real}; nothing was changed")


# ------------------------------------------------------------------ pull


@_sharing_store("pull")
def pull(home: Repo, dot: str, remote_name: str | None = None, branch: str | None = None,
         progress: Progress | None = None, stop_writers: bool = False,
         same_owner: bool = False, remote_dot: str | None = None,
         stash_on_divergence: bool = False) -> Transfer:
    """Fetch ``branch`` (default: the checked-out one) of the dot on the remote
    (``remote_dot``, remembered; default as before) and its new tags, then fast-forward.
    When both sides have new commits: refuse, the remote's state fetched; with
    ``stash_on_divergence``, keep the local head on a new branch (``stash/BRANCH-ID``,
    ``Transfer.stashed``) and take the remote's (the working state a reset replaces is
    saved, as ``dm reset`` does)."""
    home.require_dot(dot)
    if same_owner:
        home.set_dot_option(dot, "same_owner", "1")
    r = remotes.get(home, remote_name)
    rdot = remotes.remote_dot_for(home, r, dot, remote_dot)
    branch = check_branch(branch or home.branch(dot))
    t = remotes.transport(home, r, rdot)
    try:
        heads = t.heads()
        if branch not in heads:
            raise NotFound(f"{r.name} has no branch {branch} of {rdot}")
        new = heads[branch]
        theirs = t.tags()
        objects, nbytes = fetch_all(home, t, [new, *_new_tags(home, dot, theirs)],
                                    _have(home, dot), progress)
    finally:
        t.close()
    _track(home, dot, r.name, rdot, branch, new)
    res = Transfer(r.name, rdot, branch, home.branches(dot).get(branch), new,
                   objects=objects, bytes=nbytes, dot=dot)
    _take_tags(home, dot, theirs, branch, res)
    _land(home, res, stop_writers, stash_on_divergence)
    return res


@_sharing_store("pull")
def pull_all(home: Repo, dot: str, remote_name: str | None = None,
             progress: Progress | None = None, stop_writers: bool = False,
             same_owner: bool = False, remote_dot: str | None = None,
             stash_on_divergence: bool = False) -> list[Transfer]:
    """``dm pull --all``: fetch every branch of the dot on the remote, then land each as
    :func:`pull` does (missing ones are created, the checked-out one last). A branch that
    cannot move (diverged without ``stash_on_divergence``, uncommitted changes) is reported
    with status ``refused`` and its reason in ``notes``; the others still move."""
    home.require_dot(dot)
    if same_owner:
        home.set_dot_option(dot, "same_owner", "1")
    r = remotes.get(home, remote_name)
    rdot = remotes.remote_dot_for(home, r, dot, remote_dot)
    t = remotes.transport(home, r, rdot)
    try:
        heads = t.heads()
        if not heads:
            raise NotFound(f"{r.name} has no dot {rdot}")
        theirs = t.tags()
        got = {b: fetch_all(home, t, [new], _have(home, dot), progress)
               for b, new in sorted(heads.items())}
        fetch_all(home, t, _new_tags(home, dot, theirs), _have(home, dot), progress)
    finally:
        t.close()
    with Tx(home.conn) as c:
        for b, new in heads.items():
            refs.track(c, dot, r.name, rdot, b, new)
    current = home.branch(dot)
    out: list[Transfer] = []
    for b in sorted(heads, key=lambda b: (b == current, b)):
        res = Transfer(r.name, rdot, b, home.branches(dot).get(b), heads[b],
                       objects=got[b][0], bytes=got[b][1], dot=dot)
        if not out:
            _take_tags(home, dot, theirs, current, res)
        try:
            _land(home, res, stop_writers, stash_on_divergence)
        except Conflict as e:
            res.status = "refused"
            res.notes.append(str(e))
        out.append(res)
    return out


def _have(home: Repo, dot: str) -> list[ObjectId]:
    """Heads this store holds for ``dot``: where a remote may stop sending history."""
    return [*(h for h in home.branches(dot).values() if h), *home.remote_heads(dot).values()]


def _land(home: Repo, res: Transfer, stop_writers: bool, stash: bool) -> None:
    """Move ``res.branch`` of ``res.dot`` from ``res.old`` to the fetched ``res.new``: create
    it, fast-forward it (a reset of the checked-out branch, which saves the working state),
    or, diverged, refuse or (``stash``) keep ``old`` on a new branch and reset to ``new``."""
    dot, branch, old, new = res.dot, res.branch, res.old, res.new
    assert new is not None
    message = f"pull {res.remote} {res.remote_dot} {branch}"
    if branch not in home.branches(dot):
        with home.lock(dot, "pull"):
            home.create_branch(dot, branch, new)
            with Tx(home.conn) as tx:
                home.log_ref(tx, dot, branch, "pull", None, new, None, message)
        res.status = "created"
        return
    if old == new:
        res.status = "up to date"
        return
    if old is not None and new in _ancestry(home, old):
        res.status = "ahead"
        return
    diverged = old is not None and old not in _ancestry(home, new)
    if diverged and not stash:
        raise Conflict(
            f"{branch} has commits that {res.remote}'s {res.remote_dot} lacks, and it has "
            f"others: its state is fetched as {new.hex()[:12]}. Keep yours on a new branch "
            f"(dm checkout -b NAME), then take {res.remote}'s with dm reset --hard "
            f"{new.hex()[:12]} on {branch}; or replace {res.remote}'s with dm push --force; "
            "or dm pull --stash-on-divergence does the first two")
    made = False
    if diverged and old is not None:
        taken: dict[str, ObjectId | None] = {n: None for n in home.tags(dot)}
        res.stashed, there = _stash_name(branch, old, {**taken, **home.branches(dot)})
        if not there:
            with home.lock(dot, "pull"):
                home.create_branch(dot, res.stashed, old)
                with Tx(home.conn) as tx:
                    home.log_ref(tx, dot, res.stashed, "pull", None, old, None,
                                 f"{message}: {branch} diverged, its head kept here")
            made = True
    try:
        if branch == home.branch(dot):
            res.restored = checkout_ops.reset_hard(
                home, dot, new.hex(), stop_writers=stop_writers, expect_old=old,
                action="pull", message=message)
        else:
            moved = _move_parked(home, dot, branch, old, new, message, stop_writers)
            res.notes += [f"stopped {w}; dm does not restart processes it did not start"
                          for w in moved.processes]
            res.notes += [f"restarted {c} on the pulled state of {branch}"
                          for c in moved.containers]
    except BaseException:
        if made and res.stashed:  # the branch did not move: it holds what the stash held
            with home.lock(dot, "pull"), Tx(home.conn) as tx:
                refs.delete_branch(tx, dot, res.stashed)
        res.stashed = None
        raise
    res.status = "stashed" if res.stashed else "fast-forward"


def _stash_name(branch: str, head: ObjectId,
                taken: dict[str, ObjectId | None]) -> tuple[str, bool]:
    """A branch name for a diverged ``head`` of ``branch``: ``stash/BRANCH-ID``, or with a
    ``-N`` after it when a ref of ``taken`` (name -> head; tags as None) has that name;
    ``True`` when a branch of that name holds ``head`` already (a stash pulled or pushed
    before), to be used as it is."""
    base = f"stash/{branch}-{head.hex()[:8]}"
    if len(base) > MAX_NAME - 3:
        base = f"stash/{head.hex()[:12]}"
    name, n = base, 1
    while name in taken:
        if taken[name] == head:
            return name, True
        n += 1
        name = f"{base}-{n}"
    return check_branch(name), False


def _new_tags(home: Repo, dot: str | None, theirs: dict[str, Tag]) -> list[ObjectId]:
    """The commits of the remote's tags that a pull or clone will take (names free here)."""
    mine = home.tags(dot) if dot else {}
    return [tag.commit for name, tag in sorted(theirs.items()) if name not in mine]


def _take_tags(home: Repo, dot: str, theirs: dict[str, Tag], branch: str,
               res: Transfer) -> None:
    """Make here the remote's tags this dot lacks (their commits were fetched); a name that
    is taken here (another tag, a branch) keeps what it names, with a note saying so."""
    mine = home.tags(dot)
    branches = home.branches(dot)
    for name, tag in sorted(theirs.items()):
        if name in mine:
            if mine[name].commit != tag.commit:
                res.notes.append(f"tag {name} names {mine[name].commit.hex()[:12]} here and "
                                 f"{tag.commit.hex()[:12]} on {res.remote}: kept yours")
            continue
        if name in branches or name == branch:
            res.notes.append(f"tag {name} of {res.remote} was not taken: {name} is a branch "
                             "here")
            continue
        home.add_tag(dot, name, tag.commit, tag.message, tag.tagger, ts_ns=tag.ts_ns)
        res.tags.append(name)


def fetch_all(home: Repo, t: Transport, wanted: list[ObjectId], have: Sequence[ObjectId],
              progress: Progress | None = None) -> tuple[int, int]:
    """:func:`fetch` each of ``wanted`` (a branch's head, tags' commits), in that order."""
    objects = nbytes = 0
    for i, head in enumerate(wanted):
        got = fetch(home, t, head, [*have, *wanted[:i]], progress)
        objects, nbytes = objects + got[0], nbytes + got[1]
    return objects, nbytes


@_sharing_store("fetch")
def fetch_ref(home: Repo, dot: str, ref: str, remote_name: str | None = None) -> ObjectId:
    """Bring a state that is not here from the dot's remote: one of its tags (made here
    too), one of its branches' heads (kept reachable as the remote head seen), or a commit
    by its whole id. Returns the commit."""
    home.require_dot(dot)
    r = remotes.get(home, remote_name)
    rdot = remotes.remote_dot_for(home, r, dot, None)
    t = remotes.transport(home, r, rdot)
    try:
        heads, theirs = t.heads(), t.tags()
        if ref in theirs:
            want = theirs[ref].commit
        elif ref in heads:
            want = heads[ref]
        elif len(ref) == 64 and all(ch in "0123456789abcdef" for ch in ref):
            want = ObjectId(bytes.fromhex(ref))
        else:
            raise NotFound(f"unknown ref {ref!r}: not in dot {dot!r}, nor a tag or branch of "
                           f"{r.name}'s {rdot}")
        have = [h for h in home.branches(dot).values() if h]
        fetch(home, t, want, [*have, *home.remote_heads(dot).values()])
    finally:
        t.close()
    if ref in theirs:
        res = Transfer(r.name, rdot, ref, None, want)
        _take_tags(home, dot, {ref: theirs[ref]}, home.branch(dot), res)
        if not res.tags:
            raise Conflict(f"{res.notes[0]}: name the state by its id, {want.hex()}")
    elif ref in heads:
        _track(home, dot, r.name, rdot, ref, want)
    return want


def _move_parked(home: Repo, dot: str, branch: str, old: ObjectId | None, new: ObjectId,
                 message: str, stop_writers: bool = False) -> Stopped:
    """Fast-forward a branch that is not checked out. Its parked working folders, if clean,
    are dropped so that the next checkout builds them from the new head. Folders in use (a
    container pinned to the branch with ``@BRANCH``, a process) make it refuse, unless
    ``stop_writers``: then processes are stopped, and containers stopped and started again
    on the new head's folders, built here."""
    with home.lock(dot, "pull"):
        recover(home, dot)
        before = home.commit(old) if old else None
        parked = {s: home.parked(dot, branch, s) for s in home.subdots(dot)}
        parked = {s: p for s, p in parked.items() if p.exists()}
        backend = backend_of(home)
        roots = {s: backend.snapshot(p, home.packs, None, home.load_cache(dot, branch, s)).root
                 for s, p in parked.items()}
        if roots and is_dirty(roots, before):
            raise Conflict(f"branch {branch} has changes that are not committed: dm checkout "
                           f"{branch} and commit them, then pull again")
        stopped = Stopped(find_writers(parked.values()) if parked else [],
                          pinned_containers(dot, branch))
        users = [*map(str, stopped.processes),
                 *(f"{c} (pinned with @{branch})" for c in stopped.containers)]
        if users and not stop_writers:
            raise Conflict(f"branch {branch}'s folders are in use by {', '.join(users)}: stop "
                           "them before the pull moves it, or add --stop-writers to have dm "
                           "stop them (and start the containers again on the pulled state)")
        stop_processes(stopped.processes, 10.0)
        stop_containers(stopped.containers, 10)
        with Tx(home.conn) as tx:
            home.set_head(tx, dot, branch, ObjectId(old) if old else None, new, "pull", None,
                          message)
            home.drop_caches(tx, dot, branch)
        if stopped.containers:  # they start again on the new head's folders, built here
            whole = home.parked_set(dot, branch)
            if whole.exists():
                backend.discard(whole)
            materialize(home, dot, branch, new, home.packs.writer())
        else:
            for p in parked.values():
                backend.discard(p)
    start_containers(stopped.containers)
    return stopped


# ------------------------------------------------------------------ clone


@_sharing_store("clone")
def clone(home: Repo, remote_name: str | None, remote_dot: str, branch: str | None = None,
          local_name: str | None = None, progress: Progress | None = None,
          same_owner: bool = False) -> Transfer:
    """Fetch a remote dot, then make a local one at its head and build its folders. The dot
    and a journal of the restore are recorded together, so a clone killed while building its
    folders is finished by running it again (or by any command on the dot)."""
    r = remotes.get(home, remote_name)
    rdot = remotes.qualify(r, remote_dot)  # a bare DOT on a hub: the user's own
    branch = check_branch(branch or DEFAULT_BRANCH)
    name = check_name(local_name or rdot.rpartition("/")[2], "local dot name")
    if home.dot_exists(name):
        j = home.pending_restore(name)
        if j is None or j.kind != "clone":
            raise AlreadyExists(f"dot {name!r} already exists: choose another with "
                                "--local-name")
        with home.lock(name, "clone"):  # a clone that was killed while building its folders
            recover(home, name)
        return Transfer(r.name, rdot, j.branch, None, j.target, "cloned", dot=name)
    t = remotes.transport(home, r, rdot)
    try:
        heads = t.heads()
        if not heads:
            raise NotFound(f"{r.name} has no dot {rdot}")
        if branch not in heads:
            raise NotFound(f"{r.name}'s {rdot} has no branch {branch} (it has "
                           f"{', '.join(sorted(heads))})")
        new = heads[branch]
        theirs = {n: tag for n, tag in t.tags().items() if n != branch}
        objects, nbytes = fetch_all(home, t, [new, *_new_tags(home, None, theirs)], [],
                                    progress)
    finally:
        t.close()
    message = f"clone {r.name} {rdot} {branch}"
    with Tx(home.conn) as tx:
        home.create_dot(name, tx, branch, new)
        for tag in theirs.values():  # held to the rules of dm tag by Tag.from_json
            refs.add_tag(tx, name, tag.name, tag.commit, tag.message, tag.tagger, tag.ts_ns)
        home.log_ref(tx, name, branch, "clone", None, new, None, message)
        home.begin_restore(tx, name, Journal("clone", branch, new, new, None, "clone", message))
        refs.track(tx, name, r.name, rdot, branch, new)
        if same_owner:
            config.set_dot_option(tx, name, "same_owner", "1")
    with home.lock(name, "clone"):
        recover(home, name)  # builds the folders, then ends the journal
    if home.current_dot() is None:
        home.set_current_dot(name)
    return Transfer(r.name, rdot, branch, None, new, "cloned", objects, nbytes,
                    tags=sorted(theirs), dot=name)


__all__ = ["Transfer", "clone", "fetch", "fetch_all", "fetch_ref", "pull", "pull_all",
           "push"]
