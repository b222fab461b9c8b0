"""``dm hub gc``: free what no dot on the hub holds any more, while pushes and fetches run.

Objects belong to dots through ``members``; an index row (``objects``) says in which pack
blob an object's bytes are. Garbage is an index row no member names (its dots were deleted).
A run plans, then applies, in steps that each leave a whole hub if the process dies there:

1. delete garbage index rows, in batches, each delete re-checking membership in its own
   transaction; a pack none of whose rows are left is *doomed* (``doomed`` table, in the
   same transaction);
2. repack packs whose live bytes are under a fraction of the blob: their objects are copied
   into a new pack blob (written first), their rows moved to it, and the old pack doomed;
3. delete doomed blobs once the grace period has passed since they were doomed (a fetch
   that read an object's location just before still finds the bytes meanwhile);
4. delete pack blobs that no row names and that are older than the grace period: what a
   push killed between writing its pack and indexing it left (a push under way looks the
   same, for a moment).

The rule that makes this safe against a push (``HubStore.receive``), which reads which
objects the hub has, skips sending their bytes to the blob store, and then makes them
members: gc deletes a row only in a transaction that first locks it (``FOR UPDATE``) and then
finds no member naming it; receive, in the transaction that adds the members, re-reads the
rows of every object of its batch holding them ``FOR SHARE``, and if gc took any, writes
those objects' bytes again (it has them) and retries. Both lock rows in id order. SQLite's
single writer gives the same order. See docs/format.md, "The hub".
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from dotmesh.errors import Locked, UsageError
from dotmesh.model.ids import ObjectId, object_id
from dotmesh.remote.blobs import BlobEntry
from dotmesh.remote.packed import read_records, write_pack
from dotmesh.remote.wire import MAX_BATCH, Record
from dotmesh.server.hub.storage import QUERY_BATCH, HubStore, doomed, members, objects
from dotmesh.store.packs import PACK_MAGIC, RECORD, PackLocation

PREFIX = "packs/"
PACK_KEY = re.compile(r"packs/[0-9a-f]{32}\.pack")  # remote/packed.write_pack's names
GRACE = 3600.0  # seconds: far longer than any request of a hub takes
REPACK_BELOW = 0.5  # live fraction of a pack blob under which it is rewritten
REPACK_TARGET = MAX_BATCH  # bytes of live objects per new pack
_LOCK_KEY = 0x646D6763  # "dmgc": PostgreSQL advisory lock of the running gc

Progress = Callable[[int], None]


@dataclass
class Plan:
    """What a run will do, read from the database and the blob store's listing."""

    now_ns: int
    grace_ns: int
    repack_below: float
    objects: int = 0  # index rows
    packs: int = 0  # pack blobs listed
    stored: int = 0  # bytes of pack blobs listed
    garbage_objects: int = 0
    garbage_bytes: int = 0  # their records' bytes in packs
    drop: list[str] = field(default_factory=list)  # every object garbage: doomed
    repack: list[str] = field(default_factory=list)
    repack_copy: int = 0  # live bytes a repack copies
    due: list[BlobEntry] = field(default_factory=list)  # doomed, past the grace period
    waiting: list[tuple[BlobEntry, int]] = field(default_factory=list)  # doomed, due at ns
    orphans: list[BlobEntry] = field(default_factory=list)  # unindexed, older than grace
    young: list[BlobEntry] = field(default_factory=list)  # unindexed, maybe a push's
    sizes: dict[str, int] = field(default_factory=dict)

    def doomed_now(self) -> list[str]:
        """Packs this run dooms."""
        return self.drop + self.repack

    def freeing_now(self) -> tuple[int, int]:
        """(packs, bytes) this run deletes from the blob store."""
        gone = [e.key for e in self.due + self.orphans]
        if self.grace_ns == 0:
            gone += self.doomed_now()
        return len(gone), sum(self.sizes.get(k, 0) for k in gone) - (
            self.repack_copy + len(PACK_MAGIC) if self.grace_ns == 0 and self.repack
            else 0)

    def freeing_later(self) -> tuple[int, int]:
        """(packs, bytes) this run dooms, deleted by a run after the grace period."""
        if self.grace_ns == 0:
            return 0, 0
        later = self.doomed_now() + [e.key for e, _ in self.waiting]
        copied = self.repack_copy + len(PACK_MAGIC) if self.repack else 0
        return len(later), sum(self.sizes.get(k, 0) for k in later) - copied

    def work(self) -> int:
        """Bytes of progress a run reports."""
        return (self.garbage_bytes + self.repack_copy
                + sum(e.size for e in self.due + self.orphans))

    def to_json(self) -> dict[str, Any]:
        now_p, now_b = self.freeing_now()
        later_p, later_b = self.freeing_later()
        return {"objects": self.objects, "packs": self.packs, "stored_bytes": self.stored,
                "garbage_objects": self.garbage_objects, "garbage_bytes": self.garbage_bytes,
                "packs_emptied": len(self.drop), "packs_repacked": len(self.repack),
                "repack_copy_bytes": self.repack_copy,
                "unindexed_packs": len(self.orphans),
                "unindexed_packs_too_young": len(self.young),
                "free_now": {"packs": now_p, "bytes": now_b},
                "free_after_grace": {"packs": later_p, "bytes": later_b},
                "grace_seconds": self.grace_ns / 1e9}


@dataclass
class Freed:
    """What a run did."""

    objects: int = 0  # index rows deleted
    packs_deleted: int = 0
    bytes_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    bytes_copied: int = 0
    packs_doomed: int = 0
    bytes_doomed: int = 0  # still in the blob store, until a run after the grace period
    due_ns: int = 0  # when the doomed blobs may go
    damaged: list[str] = field(default_factory=list)  # packs left alone: bytes not their ids

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "packs_deleted": self.packs_deleted,
                "bytes_deleted": self.bytes_deleted, "packs_repacked": self.packs_repacked,
                "packs_written": self.packs_written, "bytes_copied": self.bytes_copied,
                "packs_waiting": self.packs_doomed, "bytes_waiting": self.bytes_doomed,
                "damaged_packs": self.damaged}


def check_options(grace: float, repack_below: float) -> None:
    if not grace >= 0:
        raise UsageError("--grace is a number of seconds, 0 or more")
    if not 0 <= repack_below <= 1:
        raise UsageError("--repack-below is a fraction between 0 and 1")


def _live() -> Any:
    return sa.exists().where(members.c.oid == objects.c.oid)


def plan(store: HubStore, grace: float = GRACE, repack_below: float = REPACK_BELOW) -> Plan:
    """Read what a run would do. Lists the blobs before reading the index, so that a pack a
    push indexes meanwhile is seen as a young unindexed blob, never as an old one."""
    check_options(grace, repack_below)
    p = Plan(time.time_ns(), int(grace * 1e9), repack_below)
    listed = store.blobs.entries(PREFIX)
    p.packs, p.stored = len(listed), sum(e.size for e in listed)
    p.sizes = {e.key: e.size for e in listed}
    live = _live()
    header = RECORD.size
    q = sa.select(objects.c.pack, sa.func.count(), sa.func.sum(objects.c.stored_len),
                  sa.func.sum(sa.case((live, 1), else_=0)),
                  sa.func.sum(sa.case((live, objects.c.stored_len), else_=0))
                  ).group_by(objects.c.pack)
    indexed: set[str] = set()
    with store.engine.connect() as c:
        for pack, n, stored, n_live, live_stored in c.execute(q):
            indexed.add(pack)
            n_live, live_stored = int(n_live or 0), int(live_stored or 0)
            p.objects += n
            p.garbage_objects += n - n_live
            p.garbage_bytes += int(stored) - live_stored + (n - n_live) * header
            live_bytes = live_stored + n_live * header
            if n_live == 0:
                p.drop.append(pack)
            elif live_bytes < repack_below * p.sizes.get(pack, 0):
                p.repack.append(pack)
                p.repack_copy += live_bytes
        gone = {r.pack: int(r.doomed_ns) for r in c.execute(sa.select(doomed))}
    for e in listed:
        if e.key in gone:
            due = gone[e.key] + p.grace_ns
            if due <= p.now_ns:
                p.due.append(e)
            else:
                p.waiting.append((e, due))
        elif e.key not in indexed and PACK_KEY.fullmatch(e.key):  # only what write_pack names
            (p.orphans if e.written_ns + p.grace_ns <= p.now_ns else p.young).append(e)
    return p


@contextmanager
def running(store: HubStore) -> Iterator[None]:
    """One gc at a time over a hub's database (a PostgreSQL advisory lock held by this
    session, or an flock beside the SQLite file); a killed gc's lock goes with it."""
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as c:
            if not c.execute(sa.text("SELECT pg_try_advisory_lock(:k)"),
                             {"k": _LOCK_KEY}).scalar():
                raise Locked("another dm hub gc is running on this hub's database")
            try:
                yield
            finally:
                c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                c.commit()
        return
    db = store.engine.url.database
    if not db or db == ":memory:":
        yield
        return
    fd = os.open(f"{db}.gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked("another dm hub gc is running on this hub's database") from None
        yield
    finally:
        os.close(fd)


def apply(store: HubStore, p: Plan, progress: Progress | None = None) -> Freed:
    """Do what ``p`` planned, re-checking everything as it goes (pushes and other hub
    processes go on meanwhile)."""
    tick = progress or (lambda n: None)
    out = Freed()
    with running(store):
        _collect(store, out, tick)
        _repack(store, p, out, tick)
        _delete_doomed(store, p, out, tick)
        _delete_orphans(store, p, out, tick)
        with store.engine.connect() as c:
            rows = c.execute(sa.select(doomed)).all()
        left = {r.pack: int(r.doomed_ns) for r in rows}
        sizes = {e.key: e.size for e in store.blobs.entries(PREFIX)}
        waiting = [k for k in left if k in sizes]
        out.packs_doomed = len(waiting)
        out.bytes_doomed = sum(sizes[k] for k in waiting)
        out.due_ns = max((left[k] for k in waiting), default=0) + p.grace_ns
    return out


def _collect(store: HubStore, out: Freed, tick: Progress) -> None:
    """Step 1: delete index rows no member names, a batch per transaction."""
    pg = store.engine.dialect.name == "postgresql"
    after = b""
    while True:
        with store.engine.connect() as c:
            batch = [ObjectId(bytes(r[0])) for r in c.execute(
                sa.select(objects.c.oid).where(~_live(), objects.c.oid > after)
                .order_by(objects.c.oid).limit(QUERY_BATCH))]
        if not batch:
            return
        after = batch[-1]
        with store.tx() as c:
            if pg:  # lock first: the delete's snapshot then has every member added before
                c.execute(sa.select(objects.c.oid).where(objects.c.oid.in_(batch))
                          .order_by(objects.c.oid).with_for_update())
            rows = c.execute(objects.delete().where(objects.c.oid.in_(batch), ~_live())
                             .returning(objects.c.pack, objects.c.stored_len)).all()
            _doom_empty(c, {r.pack for r in rows})
        out.objects += len(rows)
        tick(sum(r.stored_len + RECORD.size for r in rows))


def _doom_empty(c: sa.Connection, packs: set[str]) -> None:
    """In the transaction that took rows out of ``packs``: doom those left without any."""
    if not packs:
        return
    still = {r[0] for r in c.execute(sa.select(objects.c.pack).where(
        objects.c.pack.in_(sorted(packs))).distinct())}
    now = time.time_ns()
    rows = [{"pack": k, "doomed_ns": now} for k in sorted(packs - still)]
    if rows:
        c.execute(_insert_ignore(c, doomed), rows)


def _insert_ignore(c: sa.Connection, table: sa.Table) -> Any:
    if c.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415
        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415
    return sqlite_insert(table).on_conflict_do_nothing()


def _repack(store: HubStore, p: Plan, out: Freed, tick: Progress) -> None:
    """Step 2: copy the live objects of sparse packs into new packs (written before any row
    moves), move their rows, doom the old packs."""
    todo: list[tuple[Record, str]] = []
    size = 0
    for pack in p.repack:
        with store.engine.connect() as c:
            rows = c.execute(sa.select(objects).where(objects.c.pack == pack)).all()
        locs = {ObjectId(bytes(r.oid)): PackLocation(r.kind, r.pack, r.offset, r.stored_len,
                                                     r.raw_len, bool(r.zstd)) for r in rows}
        try:
            records = read_records(store.blobs, locs)
        except Exception as e:  # noqa: BLE001 - a pack gc cannot read is left as it is
            out.damaged.append(f"{pack}: {e}")
            continue
        if any(object_id(r.raw()) != r.oid for r in records):
            out.damaged.append(f"{pack}: an object does not match its id")
            continue
        todo.extend((r, pack) for r in records)
        size += sum(len(r.payload) + RECORD.size for r in records)
        out.packs_repacked += 1
        if size >= REPACK_TARGET:
            _flush(store, todo, out, tick)
            todo, size = [], 0
    if todo:
        _flush(store, todo, out, tick)


def _flush(store: HubStore, todo: list[tuple[Record, str]], out: Freed,
           tick: Progress) -> None:
    key, locs = write_pack(store.blobs, PREFIX, [r for r, _ in todo])
    moves = sorted(((r.oid, old) for r, old in todo), key=lambda x: x[0])
    with store.tx() as c:
        c.execute(objects.update().where(objects.c.oid == sa.bindparam("b_oid"),
                                         objects.c.pack == sa.bindparam("b_old"))
                  .values(pack=key, offset=sa.bindparam("b_off")),
                  [{"b_oid": oid, "b_old": old, "b_off": locs[oid].offset}
                   for oid, old in moves])
        _doom_empty(c, {old for _, old in moves})
    out.packs_written += 1
    copied = sum(len(r.payload) + RECORD.size for r, _ in todo)
    out.bytes_copied += copied
    tick(copied)


def _delete_doomed(store: HubStore, p: Plan, out: Freed, tick: Progress) -> None:
    """Step 3: delete doomed blobs whose grace period has passed (this run's too, with a
    grace of 0); their row goes after the blob, so a kill between leaves a row whose blob
    a later run finds gone."""
    cutoff = time.time_ns() - p.grace_ns
    with store.engine.connect() as c:
        due = [r.pack for r in c.execute(sa.select(doomed.c.pack).where(
            doomed.c.doomed_ns <= cutoff))]
    sizes = {e.key: e.size for e in store.blobs.entries(PREFIX)} if due else {}
    for pack in due:
        with store.engine.connect() as c:
            named = c.execute(sa.select(objects.c.oid).where(objects.c.pack == pack)
                              .limit(1)).first() is not None
        if not named:  # (never, by the rules above: a doomed pack gets no rows)
            store.blobs.delete(pack)
            if pack in sizes:
                out.packs_deleted += 1
                out.bytes_deleted += sizes[pack]
                tick(sizes[pack])
        with store.tx() as c:
            c.execute(doomed.delete().where(doomed.c.pack == pack))


def _delete_orphans(store: HubStore, p: Plan, out: Freed, tick: Progress) -> None:
    """Step 4: pack blobs no row names, older than the grace period (a push killed between
    writing its pack and indexing it), checked again one by one."""
    for e in p.orphans:
        with store.engine.connect() as c:
            named = c.execute(sa.select(objects.c.oid).where(objects.c.pack == e.key)
                              .limit(1)).first() is not None
            named = named or c.execute(sa.select(doomed.c.pack).where(
                doomed.c.pack == e.key)).first() is not None
        if not named:
            store.blobs.delete(e.key)
            out.packs_deleted += 1
            out.bytes_deleted += e.size
            tick(e.size)
