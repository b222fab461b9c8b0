"""What a hub knows: accounts, dots, refs and the object index in a database (SQLite for one
process, PostgreSQL for several), object bytes in a blob store (a folder, or an S3 bucket).

Hub processes keep no state of their own, so any number can serve the same database and
bucket. Every object is stored once, but belongs to the dots it was pushed to: a dot's
readers see only its own objects, and a pusher must send an object for it to join a dot,
even if the hub has it for another dot (else a push could probe other dots' contents).
A ref only moves to a commit whose whole closure belongs to the dot.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dotmesh.errors import (
    AlreadyExists,
    Conflict,
    Corrupt,
    Forbidden,
    InternalError,
    NotFound,
    Unauthorized,
    UsageError,
)
from dotmesh.model.graph import check_fast_forward, commits_between, walk_commits
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import check_branch, check_name
from dotmesh.model.objects import KIND_COMMIT, Commit
from dotmesh.model.tags import MAX_TAGGER, Tag, check_new_tag_name, check_tag_fields
from dotmesh.remote import graph
from dotmesh.remote.blobs import Blobs, StorageError
from dotmesh.remote.packed import first_within, read_records, write_pack
from dotmesh.remote.wire import KIND_FILELIST_DELTA, KIND_NAMES, Record
from dotmesh.store.packs import PackLocation

md = sa.MetaData()
users = sa.Table("users", md, sa.Column("name", sa.String(64), primary_key=True),
                 sa.Column("created_ns", sa.BigInteger, nullable=False))
api_keys = sa.Table("api_keys", md, sa.Column("digest", sa.String(64), primary_key=True),
                    sa.Column("username", sa.String(64), nullable=False),
                    sa.Column("created_ns", sa.BigInteger, nullable=False))
dots = sa.Table("dots", md, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                sa.Column("namespace", sa.String(64), nullable=False),
                sa.Column("name", sa.String(64), nullable=False),
                sa.Column("created_ns", sa.BigInteger, nullable=False),
                sa.UniqueConstraint("namespace", "name"))
collaborators = sa.Table("collaborators", md,
                         sa.Column("dot_id", sa.Integer, primary_key=True),
                         sa.Column("username", sa.String(64), primary_key=True))
branches = sa.Table("branches", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("head", sa.LargeBinary(32), nullable=False))
objects = sa.Table("objects", md, sa.Column("oid", sa.LargeBinary(32), primary_key=True),
                   sa.Column("kind", sa.SmallInteger, nullable=False),
                   sa.Column("pack", sa.String(200), nullable=False),
                   sa.Column("offset", sa.BigInteger, nullable=False),
                   sa.Column("stored_len", sa.Integer, nullable=False),
                   sa.Column("raw_len", sa.Integer, nullable=False),
                   sa.Column("zstd", sa.Boolean, nullable=False))
members = sa.Table("members", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                   sa.Column("oid", sa.LargeBinary(32), primary_key=True))
verified = sa.Table("verified", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                    sa.Column("oid", sa.LargeBinary(32), primary_key=True))
# Added after version 1's tables: create_all makes missing tables, never missing columns.
disabled = sa.Table("disabled_users", md, sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("disabled_ns", sa.BigInteger, nullable=False))
tags = sa.Table("tags", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                sa.Column("name", sa.String(64), primary_key=True),
                sa.Column("head", sa.LargeBinary(32), nullable=False),
                sa.Column("message", sa.Text, nullable=False),
                sa.Column("tagger", sa.String(MAX_TAGGER), nullable=False),
                sa.Column("ts_ns", sa.BigInteger, nullable=False))
# Pack blobs no index row names any more, since when: dm hub gc deletes them a grace period
# later, so that a read that found an object there just before still finds the bytes.
doomed = sa.Table("doomed", md, sa.Column("pack", sa.String(200), primary_key=True),
                  sa.Column("doomed_ns", sa.BigInteger, nullable=False))
# A collaborator's role: "read" or "write"; a collaborators row without one here (made before
# roles) is "write", as every collaborator was then.
collaborator_roles = sa.Table("collaborator_roles", md,
                              sa.Column("dot_id", sa.Integer, primary_key=True),
                              sa.Column("username", sa.String(64), primary_key=True),
                              sa.Column("role", sa.String(8), nullable=False))
# Dots anyone may read, even without an API key (pushing still takes write access).
public_dots = sa.Table("public_dots", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                       sa.Column("since_ns", sa.BigInteger, nullable=False))
# Which dot a fork was made from (as it was named then).
forks = sa.Table("forks", md, sa.Column("dot_id", sa.Integer, primary_key=True),
                 sa.Column("source", sa.String(130), nullable=False),
                 sa.Column("forked_ns", sa.BigInteger, nullable=False))
# The web pages' signed-in sessions (server/web/hub.py), by their cookie's nonce: signing
# out deletes the row, so a copy of the cookie kept from before is refused from then on.
web_sessions = sa.Table("web_sessions", md, sa.Column("nonce", sa.String(64), primary_key=True),
                        sa.Column("username", sa.String(64), nullable=False),
                        sa.Column("created_ns", sa.BigInteger, nullable=False))
# Values the hub makes once, for every process and host that serves it: "web_secret" signs
# the web pages' cookies (a hub scaled out over several hosts accepts them on each).
settings = sa.Table("settings", md, sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("value", sa.LargeBinary, nullable=False))
# Tables that hold rows per dot: they go with it (_drop_dots).
PER_DOT = (branches, tags, members, verified, collaborators, collaborator_roles, public_dots,
           forks)
ROLES = ("read", "write")
# Indexes added after version 1 (create_all makes them only with a new table): what gc asks
# (which objects no dot holds, which rows a pack still has).
INDEXES = ("CREATE INDEX IF NOT EXISTS members_oid ON members (oid)",
           "CREATE INDEX IF NOT EXISTS objects_pack ON objects (pack)")
RECEIVE_TRIES = 5
KEY_ID = re.compile(r"[0-9a-f]{12}")
QUERY_BATCH = 500
HISTORY_LIMIT = 1000
HISTORY_BYTES = 32 << 20  # of one history answer
GETTER_CACHE = 64 << 20  # decompressed objects a walk over a dot keeps at hand


@dataclass(frozen=True)
class Dot:
    id: int
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once: only its digest is kept
    id: str
    created_ns: int


def key_digest(key: str) -> str:
    """Keys are 256 random bits, so one SHA-256 is as good as a slow hash to store them."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """A key's public name: the start of its stored digest (api_keys has no id column, and
    create_all does not add columns to a deployed hub's tables). 48 bits of a hash of 256
    random bits tell nothing of the key."""
    return digest[:12]


def check_key_id(text: str) -> str:
    kid = text.strip().lower()
    if not KEY_ID.fullmatch(kid):
        raise UsageError(f"bad key id {text!r}: a key id is 12 hex digits, as "
                         "dm hub key list USER shows")
    return kid


def engine_for(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(eng, "connect")
        def _wal(conn: Any, _: Any) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")

        return eng
    return sa.create_engine(url, pool_pre_ping=True, pool_size=8)


class HubStore:
    def __init__(self, db_url: str, blobs: Blobs) -> None:
        safe = db_url.split("@")[-1] if "@" in db_url else db_url  # no password in messages
        try:
            self.engine = engine_for(db_url)
            md.create_all(self.engine)
            self._indexes()
        except ImportError as e:
            raise UsageError(f"no driver for database {safe!r} ({e.name}): use sqlite:///PATH "
                             "or postgresql+psycopg://...") from None
        except (sa.exc.SQLAlchemyError, ValueError) as e:
            cause = getattr(e, "orig", None) or e
            raise StorageError(f"cannot use database {safe!r}: "
                               f"{str(cause).strip().splitlines()[0]}") from None
        self.blobs = blobs

    def _indexes(self) -> None:
        for attempt in range(3):
            try:
                with self.tx() as c:
                    for ddl in INDEXES:
                        c.exec_driver_sql(ddl)
                return
            except sa.exc.IntegrityError:  # another hub process made it at the same time
                if attempt == 2:
                    raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as c:
            yield c

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415
            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415
        return sqlite_insert(table).on_conflict_do_nothing()

    def _bulk_insert_ignore(self, c: sa.Connection, table: sa.Table,
                            rows: list[tuple[Any, ...]]) -> None:
        """Insert many rows (in column order), skipping existing keys: straight to the
        driver, since SQLAlchemy's per-row work would cost more than the database's here."""
        if not rows:
            return
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        cols = ", ".join(f'"{col.name}"' for col in table.columns)
        marks = ", ".join([mark] * len(table.columns))
        c.exec_driver_sql(f'INSERT INTO "{table.name}" ({cols}) VALUES ({marks}) '
                          "ON CONFLICT DO NOTHING", rows)

    # ------------------------------------------------------------ accounts
    def add_user(self, name: str) -> NewKey:
        """Create an account; returns its API key, which is stored only hashed."""
        check_name(name, "user name")
        with self.tx() as c:
            if c.execute(sa.select(users.c.name).where(users.c.name == name)).first():
                raise AlreadyExists(f"user {name!r} already exists")
            c.execute(users.insert().values(name=name, created_ns=time.time_ns()))
            return self._insert_key(c, name)

    def new_key(self, name: str) -> NewKey:
        """Another API key for an existing user (the old ones keep working)."""
        check_name(name, "user name")
        with self.tx() as c:
            self._require_user(c, name)
            return self._insert_key(c, name)

    @staticmethod
    def _insert_key(c: sa.Connection, name: str) -> NewKey:
        key = "dmk_" + secrets.token_urlsafe(32)
        digest, now = key_digest(key), time.time_ns()
        c.execute(api_keys.insert().values(digest=digest, username=name, created_ns=now))
        return NewKey(key, key_id(digest), now)

    @staticmethod
    def _require_user(c: sa.Connection, name: str) -> None:
        if not c.execute(sa.select(users.c.name).where(users.c.name == name)).first():
            raise NotFound(f"no user named {name!r}")

    def authenticate(self, name: str, key: str) -> None:
        """Unauthorized unless ``key`` is one of ``name``'s and the account is enabled. Read
        from the database on every request, never cached: a revoked key or a disabled
        account is refused from the next request on."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(api_keys.c.username, disabled.c.name).outerjoin(
                disabled, disabled.c.name == api_keys.c.username).where(
                api_keys.c.digest == key_digest(key))).first()
        if row is None or not secrets.compare_digest(row[0].encode(), name.encode()):
            raise Unauthorized(f"the hub does not know this API key for {name!r}")
        if row[1] is not None:  # said only to whoever holds a valid key
            raise Unauthorized(f"the account {name!r} is disabled on this hub: ask its "
                               "admin (dm hub user enable)")

    def list_users(self) -> list[dict[str, Any]]:
        """Every account: name, created_ns, disabled, keys (how many), dots (owned)."""
        with self.engine.connect() as c:
            out = {r.name: {"name": r.name, "created_ns": r.created_ns, "disabled": False,
                            "keys": 0, "dots": []}
                   for r in c.execute(sa.select(users).order_by(users.c.name))}
            for name, n in c.execute(sa.select(api_keys.c.username, sa.func.count()).group_by(
                    api_keys.c.username)):
                if name in out:
                    out[name]["keys"] = n
            for (name,) in c.execute(sa.select(disabled.c.name)):
                if name in out:
                    out[name]["disabled"] = True
            for ns, dot in c.execute(sa.select(dots.c.namespace, dots.c.name).order_by(
                    dots.c.namespace, dots.c.name)):
                if ns in out:
                    out[ns]["dots"].append(f"{ns}/{dot}")
        return list(out.values())

    def set_disabled(self, name: str, off: bool) -> bool:
        """Disable (``off``) or enable an account; False if it already was."""
        check_name(name, "user name")
        with self.tx() as c:
            self._require_user(c, name)
            if off:
                return c.execute(self._insert_ignore(disabled).values(
                    name=name, disabled_ns=time.time_ns())).rowcount == 1
            return c.execute(disabled.delete().where(disabled.c.name == name)).rowcount == 1

    def remove_user(self, name: str, with_dots: bool = False) -> list[str]:
        """Delete an account, its keys and its collaborations; with ``with_dots`` also the
        dots it owns (their refs, memberships and collaborators: ownership is the
        namespace, so a later user of the same name would get them). Returns those dots."""
        check_name(name, "user name")
        with self.tx() as c:
            # The user's row goes first: PostgreSQL then makes a concurrent dot creation
            # (which reads the row FOR SHARE) wait, and this sees the dot it made.
            if c.execute(users.delete().where(users.c.name == name)).rowcount == 0:
                raise NotFound(f"no user named {name!r}")
            owned = {r.id: f"{name}/{r.name}" for r in c.execute(
                sa.select(dots.c.id, dots.c.name).where(dots.c.namespace == name))}
            if owned and not with_dots:
                names = sorted(owned.values())
                listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                what = f"{len(names)} dots" if len(names) > 1 else "a dot"
                raise Conflict(f"{name} owns {what} ({listed}): dm hub user rm {name} "
                               "--with-dots deletes them too")
            c.execute(api_keys.delete().where(api_keys.c.username == name))
            c.execute(collaborators.delete().where(collaborators.c.username == name))
            c.execute(collaborator_roles.delete().where(
                collaborator_roles.c.username == name))
            c.execute(disabled.delete().where(disabled.c.name == name))
            self._drop_dots(c, list(owned))
        return sorted(owned.values())

    def remove_dot(self, namespace: str, name: str) -> None:
        """Delete a dot: its refs, memberships and collaborators (dm hub gc frees the
        objects no other dot holds). A push under way to it fails (_hold)."""
        check_name(namespace, "namespace")
        check_name(name, "dot name")
        with self.tx() as c:
            row = c.execute(sa.select(dots.c.id).where(dots.c.namespace == namespace,
                                                      dots.c.name == name)).first()
            if row is None:
                raise NotFound(f"the hub has no dot {namespace}/{name}")
            self._drop_dots(c, [row[0]])

    @staticmethod
    def _drop_dots(c: sa.Connection, ids: list[int]) -> None:
        """The one way dots go (dm hub user rm --with-dots, dm hub dot rm, DELETE)."""
        for i in range(0, len(ids), QUERY_BATCH):
            batch = ids[i:i + QUERY_BATCH]
            # The dots first: PostgreSQL then waits for pushes holding them (_hold), and
            # the deletes below see the rows those pushes added.
            c.execute(dots.delete().where(dots.c.id.in_(batch)))
            for table in PER_DOT:
                c.execute(table.delete().where(table.c.dot_id.in_(batch)))

    def check_key_id(self, name: str, kid: str) -> None:
        """Unauthorized unless ``name`` still holds the key whose id is ``kid`` and the
        account is enabled: a web session signed in with that key lives as long as it."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(api_keys.c.username, disabled.c.name).outerjoin(
                disabled, disabled.c.name == api_keys.c.username).where(
                api_keys.c.digest.startswith(check_key_id(kid)),
                api_keys.c.username == name)).all()
        if len(rows) != 1 or rows[0][1] is not None:
            raise Unauthorized("your session's API key was revoked, or the account is "
                               "disabled: sign in again")

    def web_secret(self) -> bytes:
        """The key that signs the web pages' cookies: made by the first hub process to ask,
        kept in the database so that every process and host of the hub has the same."""
        for _ in range(3):
            with self.engine.connect() as c:
                row = c.execute(sa.select(settings.c.value).where(
                    settings.c.name == "web_secret")).first()
            if row is not None:
                return bytes(row[0])
            try:
                with self.tx() as c:
                    c.execute(settings.insert().values(name="web_secret",
                                                       value=secrets.token_bytes(32)))
            except sa.exc.IntegrityError:  # another process made it first: read theirs
                pass
        raise InternalError("the hub's web_secret could not be made")

    def web_session_start(self, nonce: str, name: str, max_age_s: int) -> None:
        """Record a web session of ``name`` signed in now; forget those past ``max_age_s``."""
        now = time.time_ns()
        with self.tx() as c:
            c.execute(web_sessions.delete().where(
                web_sessions.c.created_ns < now - max_age_s * 10**9))
            c.execute(web_sessions.insert().values(nonce=nonce, username=name, created_ns=now))

    def web_session_end(self, nonce: str) -> None:
        """Sign a web session out: its cookie is refused from now on, copies included."""
        with self.tx() as c:
            c.execute(web_sessions.delete().where(web_sessions.c.nonce == nonce))

    def check_web_session(self, nonce: str, name: str) -> None:
        """Unauthorized unless ``name``'s web session ``nonce`` is still signed in."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(web_sessions.c.nonce).where(
                web_sessions.c.nonce == nonce, web_sessions.c.username == name)).first()
        if row is None:
            raise Unauthorized("this session was signed out: sign in again")

    def list_keys(self, name: str) -> list[tuple[str, int]]:
        """(id, created_ns) of each of ``name``'s API keys, oldest first."""
        check_name(name, "user name")
        with self.engine.connect() as c:
            self._require_user(c, name)
            rows = c.execute(sa.select(api_keys.c.digest, api_keys.c.created_ns).where(
                api_keys.c.username == name).order_by(api_keys.c.created_ns))
            return [(key_id(r.digest), r.created_ns) for r in rows]

    def revoke_key(self, kid: str, user: str | None = None) -> str:
        """Delete the API key named ``kid`` (only among ``user``'s, if given); returns whose
        it was. Requests with it fail from the next one on."""
        kid = check_key_id(kid)
        with self.tx() as c:
            q = sa.select(api_keys.c.digest, api_keys.c.username).where(
                api_keys.c.digest.startswith(kid))
            if user is not None:
                q = q.where(api_keys.c.username == user)
            rows = c.execute(q).all()
            if not rows:
                raise NotFound(f"{user} has no API key {kid}" if user else
                               f"no API key {kid} on this hub")
            if len(rows) > 1:
                raise Conflict(f"{len(rows)} API keys share id {kid} (a 1 in 2^48 chance): "
                               "none revoked")
            c.execute(api_keys.delete().where(api_keys.c.digest == rows[0].digest))
        return str(rows[0].username)

    # ------------------------------------------------------------ dots and permissions
    def find(self, namespace: str, name: str) -> Dot | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(dots.c.id).where(dots.c.namespace == namespace,
                                                      dots.c.name == name)).first()
        return Dot(row[0], namespace, name) if row else None

    def access(self, user: str | None, namespace: str, dot: Dot | None) -> str | None:
        """What ``user`` (None: no API key) may do with the dot: "owner" (everything),
        "write" (read and push), "read" (fetch, clone, pull), or None. Anyone reads a
        public dot; its owner may push a dot not made yet (which makes it)."""
        if user is not None and user == namespace:
            return "owner"
        if dot is None:
            return None
        with self.engine.connect() as c:
            role = None
            if user is not None:
                row = c.execute(sa.select(collaborators.c.username, collaborator_roles.c.role)
                                .outerjoin(collaborator_roles, sa.and_(
                                    collaborator_roles.c.dot_id == collaborators.c.dot_id,
                                    collaborator_roles.c.username == collaborators.c.username))
                                .where(collaborators.c.dot_id == dot.id,
                                       collaborators.c.username == user)).first()
                if row is not None:
                    role = "read" if row[1] == "read" else "write"
            if role is None and c.execute(sa.select(public_dots.c.dot_id).where(
                    public_dots.c.dot_id == dot.id)).first() is not None:
                role = "read"
        return role

    def dot_for(self, user: str | None, namespace: str, name: str, create: bool = False,
                write: bool = False) -> Dot:
        """The dot, if ``user`` may read it (``write``: push to it); its owner may create
        it. Without a key (``user`` None) a dot that is not public is Unauthorized, as if
        it did not exist; with one, Forbidden."""
        check_name(namespace, "namespace")
        check_name(name, "dot name")
        dot = self.find(namespace, name)
        role = self.access(user, namespace, dot)
        if role is None:
            if user is None:
                raise Unauthorized("this hub needs an API key: dm remote add NAME USER@HOST")
            raise Forbidden(f"{user} may not use {namespace}/{name}: only its owner and "
                            "collaborators may")
        if write and role == "read":
            who = "anyone" if user is None else user
            raise Forbidden(f"{who} may read {namespace}/{name} but not push to it: its "
                            f"owner may make you a write collaborator (dm hub collaborator "
                            f"add {namespace}/{name} USER --role write)")
        if dot is None:
            if not create:
                raise NotFound(f"the hub has no dot {namespace}/{name}")
            self._create(namespace, name)
            dot = self.find(namespace, name)
            if dot is None:
                raise NotFound(f"no user named {namespace!r}")
        return dot

    def _create(self, namespace: str, name: str) -> None:
        """Make a dot, only while its owner's account exists (in one statement for SQLite,
        holding the owner's row for PostgreSQL): else a removed user's in-flight push
        could leave a dot to a later user of the same name."""
        with self.tx() as c:
            c.execute(sa.select(users.c.name).where(users.c.name == namespace)
                      .with_for_update(read=True))
            owner = sa.exists().where(users.c.name == namespace)
            c.execute(self._insert_ignore(dots).from_select(
                ["namespace", "name", "created_ns"],
                sa.select(sa.literal(namespace, sa.String), sa.literal(name, sa.String),
                          sa.literal(time.time_ns(), sa.BigInteger)).where(owner)))

    def add_collaborator(self, namespace: str, name: str, user: str,
                         role: str = "write") -> None:
        """Let ``user`` read (``role`` "read") or read and push ("write") the dot; a
        collaborator already there gets the new role."""
        check_name(user, "user name")
        if role not in ROLES:
            raise UsageError(f"a collaborator's role is read or write, not {role!r}")
        if user == namespace:
            raise UsageError(f"{user} owns {namespace}/{name}: an owner is no collaborator")
        with self.engine.connect() as c:
            self._require_user(c, user)
        dot = self.dot_for(namespace, namespace, name, create=True)
        with self.tx() as c:
            c.execute(self._insert_ignore(collaborators).values(dot_id=dot.id, username=user))
            c.execute(collaborator_roles.delete().where(
                collaborator_roles.c.dot_id == dot.id, collaborator_roles.c.username == user))
            c.execute(collaborator_roles.insert().values(dot_id=dot.id, username=user,
                                                         role=role))
            self._hold(c, dot)

    def remove_collaborator(self, namespace: str, name: str, user: str) -> None:
        """Take ``user``'s access to the dot away, from their next request on."""
        check_name(user, "user name")
        dot = self.dot_for(namespace, namespace, name)
        with self.tx() as c:
            gone = c.execute(collaborators.delete().where(
                collaborators.c.dot_id == dot.id, collaborators.c.username == user)).rowcount
            c.execute(collaborator_roles.delete().where(
                collaborator_roles.c.dot_id == dot.id, collaborator_roles.c.username == user))
        if not gone:
            raise NotFound(f"{user} is not a collaborator of {dot}")

    def collaborators_of(self, dot: Dot) -> list[str]:
        return sorted(self.roles_of([dot.id]).get(dot.id, {}))

    def roles_of(self, ids: list[int]) -> dict[int, dict[str, str]]:
        """{dot id: {collaborator: role}} of the dots ``ids``."""
        out: dict[int, dict[str, str]] = {}
        with self.engine.connect() as c:
            for i in range(0, len(ids), QUERY_BATCH):
                q = sa.select(collaborators.c.dot_id, collaborators.c.username,
                              collaborator_roles.c.role).outerjoin(
                    collaborator_roles, sa.and_(
                        collaborator_roles.c.dot_id == collaborators.c.dot_id,
                        collaborator_roles.c.username == collaborators.c.username)).where(
                    collaborators.c.dot_id.in_(ids[i:i + QUERY_BATCH]))
                for dot_id, name, role in c.execute(q):
                    out.setdefault(dot_id, {})[name] = "read" if role == "read" else "write"
        return {k: dict(sorted(v.items())) for k, v in out.items()}

    def set_public(self, namespace: str, name: str, public: bool) -> bool:
        """Make the dot readable by anyone, even without a key (``public``), or not;
        False if it already was so."""
        dot = self.dot_for(namespace, namespace, name)
        with self.tx() as c:
            if public:
                changed = c.execute(self._insert_ignore(public_dots).values(
                    dot_id=dot.id, since_ns=time.time_ns())).rowcount == 1
            else:
                changed = c.execute(public_dots.delete().where(
                    public_dots.c.dot_id == dot.id)).rowcount == 1
            self._hold(c, dot)
        return changed

    def describe(self, dot: Dot) -> dict[str, Any]:
        """A dot as GET /api/v1/dots/NS/DOT tells it (openapi.yaml: Dot)."""
        with self.engine.connect() as c:
            heads = {r[0]: r[1].hex() for r in c.execute(
                sa.select(branches.c.name, branches.c.head).where(branches.c.dot_id == dot.id))}
            named = {r[0]: Tag(r[0], ObjectId(bytes(r[1])), r[2], r[3], r[4]).to_json()
                     for r in c.execute(sa.select(tags.c.name, tags.c.head, tags.c.message,
                                                  tags.c.tagger, tags.c.ts_ns)
                                        .where(tags.c.dot_id == dot.id))}
            public = c.execute(sa.select(public_dots.c.dot_id).where(
                public_dots.c.dot_id == dot.id)).first() is not None
            fork = c.execute(sa.select(forks.c.source).where(
                forks.c.dot_id == dot.id)).scalar()
        roles = self.roles_of([dot.id]).get(dot.id, {})
        return {"namespace": dot.namespace, "name": dot.name, "owner": dot.namespace,
                "branches": heads, "tags": named, "collaborators": sorted(roles),
                "roles": roles, "public": public, "forked_from": fork,
                "pushers": [dot.namespace] + [u for u, r in roles.items() if r == "write"]}


    # ------------------------------------------------------------ browsing, forks
    def visible(self, user: str | None, after: tuple[str, str] | None,
                limit: int) -> list[tuple[Dot, str]]:
        """The dots ``user`` may read (None: the public ones), each with the caller's access
        (as :meth:`access` says), by namespace and name, after ``after``: one page."""
        with self.engine.connect() as c:
            cond: sa.ColumnElement[bool] = dots.c.id.in_(sa.select(public_dots.c.dot_id))
            if user is not None:
                cond = sa.or_(dots.c.namespace == user, cond, dots.c.id.in_(
                    sa.select(collaborators.c.dot_id).where(collaborators.c.username == user)))
            q = sa.select(dots.c.id, dots.c.namespace, dots.c.name).where(cond)
            if after is not None:
                q = q.where(sa.tuple_(dots.c.namespace, dots.c.name) > after)
            rows = c.execute(q.order_by(dots.c.namespace, dots.c.name).limit(limit)).all()
            ids = [r.id for r in rows]
            public = {r[0] for r in c.execute(sa.select(public_dots.c.dot_id).where(
                public_dots.c.dot_id.in_(ids)))}
        roles = self.roles_of(ids)
        out = []
        for r in rows:
            if r.namespace == user:
                role = "owner"
            elif user is not None and user in roles.get(r.id, {}):
                role = roles[r.id][user]
            else:
                role = "read" if r.id in public else "none"
            out.append((Dot(r.id, r.namespace, r.name), role))
        return out

    def summaries(self, found: list[tuple[Dot, str]]) -> list[dict[str, Any]]:
        """What GET /api/v1/dots tells of each dot (openapi.yaml: DotSummary): branches,
        tag count, bytes of its objects, collaborators, public or not; "last_commit" is
        left to the caller (it reads objects)."""
        ids = [d.id for d, _ in found]
        heads: dict[int, dict[str, str]] = {}
        ntags: dict[int, int] = {}
        size: dict[int, tuple[int, int, int]] = {}
        with self.engine.connect() as c:
            for i in range(0, len(ids), QUERY_BATCH):
                batch = ids[i:i + QUERY_BATCH]
                for dot_id, name, head in c.execute(sa.select(
                        branches.c.dot_id, branches.c.name, branches.c.head).where(
                        branches.c.dot_id.in_(batch))):
                    heads.setdefault(dot_id, {})[name] = bytes(head).hex()
                for dot_id, n in c.execute(sa.select(tags.c.dot_id, sa.func.count()).where(
                        tags.c.dot_id.in_(batch)).group_by(tags.c.dot_id)):
                    ntags[dot_id] = n
                for dot_id, n, stored, raw in c.execute(sa.select(
                        members.c.dot_id, sa.func.count(), sa.func.sum(objects.c.stored_len),
                        sa.func.sum(objects.c.raw_len)).join(
                        objects, objects.c.oid == members.c.oid).where(
                        members.c.dot_id.in_(batch)).group_by(members.c.dot_id)):
                    size[dot_id] = (int(n), int(stored or 0), int(raw or 0))
            public = {r[0] for r in c.execute(sa.select(public_dots.c.dot_id).where(
                public_dots.c.dot_id.in_(ids)))}
        roles = self.roles_of(ids)
        out = []
        for d, role in found:
            mine = roles.get(d.id, {})
            n, stored, raw = size.get(d.id, (0, 0, 0))
            out.append({"namespace": d.namespace, "name": d.name, "owner": d.namespace,
                        "access": role, "public": d.id in public,
                        "branches": dict(sorted(heads.get(d.id, {}).items())),
                        "tags": ntags.get(d.id, 0), "objects": n, "stored_bytes": stored,
                        "raw_bytes": raw, "collaborators": mine,
                        "pushers": [d.namespace] + [u for u, r in mine.items()
                                                    if r == "write"]})
        return out

    def resolve(self, dot: Dot, ref: str) -> ObjectId:
        """A branch, a tag or a whole commit id (hex) of the dot, as a commit id."""
        head = self._head(dot, ref) if len(ref) <= 64 else None
        if head is None and len(ref) <= 64:
            head = self._tag_head(dot, ref)
        if head is None:
            try:
                raw = bytes.fromhex(ref)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise NotFound(f"{dot} has no branch or tag {ref[:80]!r} (a commit is named "
                               "by its whole id, 64 hex digits)")
            head = ObjectId(raw)
        return head

    def fork(self, user: str, source: Dot, name: str) -> Dot:
        """Make ``user``/``name`` a copy of ``source``: its branches, tags and objects (as
        memberships: no bytes are copied), not its collaborators nor publicity."""
        check_name(name, "dot name")
        try:
            with self.tx() as c:
                if c.execute(sa.select(users.c.name).where(users.c.name == user)
                             .with_for_update(read=True)).first() is None:
                    raise NotFound(f"no user named {user!r}")
                if c.execute(sa.select(dots.c.id).where(dots.c.namespace == user,
                                                        dots.c.name == name)).first():
                    raise _Exists
                made = c.execute(dots.insert().values(namespace=user, name=name,
                                                      created_ns=time.time_ns()))
                new = int(made.inserted_primary_key[0])  # type: ignore[index]
                self._hold(c, source)
                for table in (members, verified, branches, tags):
                    cols = [col.name for col in table.columns]
                    c.execute(table.insert().from_select(cols, sa.select(
                        sa.literal(new, sa.Integer), *[table.c[k] for k in cols[1:]]).where(
                        table.c.dot_id == source.id)))
                c.execute(forks.insert().values(dot_id=new, source=str(source),
                                                forked_ns=time.time_ns()))
        except (sa.exc.IntegrityError, _Exists):
            raise AlreadyExists(f"{user}/{name} exists already: give the fork another name "
                                '({"name": NAME})') from None
        return Dot(new, user, name)

    # ------------------------------------------------------------ objects
    def _present(self, table: sa.Table, ids: list[ObjectId],
                 dot: Dot | None) -> set[ObjectId]:
        found: set[ObjectId] = set()
        with self.engine.connect() as c:
            for i in range(0, len(ids), QUERY_BATCH):
                q = sa.select(table.c.oid).where(table.c.oid.in_(ids[i:i + QUERY_BATCH]))
                if dot is not None:
                    q = q.where(table.c.dot_id == dot.id)
                found.update(ObjectId(bytes(r[0])) for r in c.execute(q))
        return found

    def lacking(self, dot: Dot | None, ids: list[ObjectId]) -> set[ObjectId]:
        """Which of ``ids`` the dot does not have (all, for a dot not made yet)."""
        if dot is None:
            return set(ids)
        return set(ids) - self._present(members, ids, dot)

    def receive(self, dot: Dot, records: list[Record]) -> int:
        """Keep verified records for ``dot``: bytes the hub lacks go into a new pack blob,
        then the index, then the dot's membership. Returns how many objects were new to
        the dot: whether the hub held them for another dot must not show."""
        ids = [r.oid for r in records]
        joining = len(set(ids) - self._present(members, ids, dot))
        known = self._present(objects, ids, None)
        todo = [r for r in records if r.oid not in known]
        locs: dict[ObjectId, PackLocation[str]] = {}
        for _ in range(RECEIVE_TRIES):
            if todo:
                locs.update(write_pack(self.blobs, "packs/", todo)[1])  # durable first
            try:
                with self.tx() as c:
                    self._bulk_insert_ignore(c, objects, [
                        (oid, loc.kind, loc.pack, loc.offset, loc.stored_len, loc.raw_len,
                         loc.zstd) for oid, loc in locs.items()])
                    self._bulk_insert_ignore(c, members, [(dot.id, r.oid) for r in records])
                    self._hold(c, dot)
                    gone = self._unindexed(c, ids)
                    if gone:
                        raise _Collected(gone)
            except _Collected as e:
                # dm hub gc took the rows of bytes this batch counted on the hub having:
                # they are in this batch, so they go into a pack of their own.
                todo = [r for r in records if r.oid in e.gone]
                continue
            return joining
        raise Conflict(f"the hub's garbage collection kept taking objects of this push to "
                       f"{dot}: push again")

    def _unindexed(self, c: sa.Connection, ids: list[ObjectId]) -> set[ObjectId]:
        """Which of ``ids`` have no index row, in a transaction that has just made them
        members: the rows that are there are held (FOR SHARE, in id order as gc locks
        them) until it ends, so gc, which deletes only rows no member names and locks them
        before it looks, either sees these members or deleted the rows before this
        looked. SQLite's one writer makes the same order."""
        order = sorted(set(ids))
        found: set[ObjectId] = set()
        for i in range(0, len(order), QUERY_BATCH):
            q = sa.select(objects.c.oid).where(objects.c.oid.in_(order[i:i + QUERY_BATCH])
                                              ).order_by(objects.c.oid)
            found.update(ObjectId(bytes(r[0])) for r in c.execute(q.with_for_update(
                read=True)))
        return set(order) - found

    def _locs(self, dot: Dot, ids: list[ObjectId]) -> dict[ObjectId, PackLocation[str]]:
        out: dict[ObjectId, PackLocation[str]] = {}
        with self.engine.connect() as c:
            for i in range(0, len(ids), QUERY_BATCH):
                batch = ids[i:i + QUERY_BATCH]
                q = sa.select(objects).join(members, members.c.oid == objects.c.oid).where(
                    members.c.dot_id == dot.id, objects.c.oid.in_(batch))
                for r in c.execute(q):
                    out[ObjectId(bytes(r.oid))] = PackLocation(
                        r.kind, r.pack, r.offset, r.stored_len, r.raw_len, bool(r.zstd))
        return out

    def read(self, dot: Dot, want: dict[ObjectId, int], limit: int) -> list[Record]:
        """The records asked for, up to about ``limit`` bytes (the client asks again for the
        rest), labelled with the kinds asked for. The index keeps the kind of the first
        pusher of those bytes, maybe into another dot: telling it would tell what that dot
        holds, and insisting on it would fail this dot's reads. The asker verifies the bytes
        as the kind it asked for."""
        locs = self._locs(dot, list(want))
        for oid, kind in want.items():
            if oid not in locs:
                raise NotFound(f"{dot} has no object {oid.hex()[:16]}")
            if kind not in KIND_NAMES or kind == KIND_FILELIST_DELTA:
                raise UsageError(f"bad object kind {kind}")
        return [Record(want[r.oid], r.oid, r.raw_len, r.payload, r.zstd)
                for r in read_records(self.blobs, first_within(locs, want, limit))]

    def getter(self, dot: Dot) -> graph.Get:
        """Reads the dot's objects (decompressed), with a cache of at most GETTER_CACHE
        bytes (commits may be 1 MiB each); NotFound for others."""
        cache: dict[ObjectId, bytes] = {}
        held = [0]

        def get(oid: ObjectId) -> bytes:
            data = cache.get(oid)
            if data is None:
                locs = self._locs(dot, [oid])
                if oid not in locs:
                    raise NotFound(f"{dot} has no object {oid.hex()[:16]}")
                (rec,) = read_records(self.blobs, locs)
                data = rec.raw()
                if held[0] + len(data) > GETTER_CACHE:
                    cache.clear()
                    held[0] = 0
                cache[oid] = data
                held[0] += len(data)
            return data
        return get

    def history(self, dot: Dot, head: ObjectId, limit: int = HISTORY_LIMIT,
                have: set[ObjectId] | frozenset[ObjectId] = frozenset()) -> list[Record]:
        """Commit ``head`` and its ancestors, nearest first, up to ``limit`` commits and
        HISTORY_BYTES of them, not going past commits in ``have`` (the asker has those and
        what they descend from); the asker comes back for the parents it still lacks."""
        getter = self.getter(dot)
        size = 0

        def get(oid: ObjectId) -> bytes:
            nonlocal size
            data = getter(oid)
            size += len(data)
            return data
        order: list[ObjectId] = []
        for c in walk_commits(get, [head], stop=have.__contains__, order="breadth",
                              limit=limit):
            if size >= HISTORY_BYTES:  # what the commits before this one weigh
                break
            order.append(c)
        return self.read(dot, dict.fromkeys(order, KIND_COMMIT), HISTORY_BYTES)

    # ------------------------------------------------------------ refs
    def set_ref(self, dot: Dot, branch: str, old: ObjectId | None, new: ObjectId,
                force: bool) -> None:
        """Move ``branch`` from ``old`` to ``new`` (compare-and-swap). ``new`` and all it
        needs must belong to the dot; without ``force``, ``old`` must be its ancestor. A
        branch already at ``new`` is success: two pushes of one commit both succeed."""
        check_branch(branch)
        current = self._head(dot, branch)
        if current == new:
            return
        if current != old:
            raise Conflict(f"{dot} branch {branch} moved meanwhile (it is now at "
                           f"{current.hex()[:12] if current else 'nothing'}): pull first")
        get = self._verify(dot, new)
        if current is not None and not force:
            check_fast_forward(get, new, current, f"{dot} branch {branch}")
        try:
            with self.tx() as c:
                if current is None:
                    c.execute(branches.insert().values(dot_id=dot.id, name=branch, head=new))
                elif c.execute(branches.update().where(
                        branches.c.dot_id == dot.id, branches.c.name == branch,
                        branches.c.head == current).values(head=new)).rowcount != 1:
                    raise _Raced
                self._hold(c, dot)
        except (sa.exc.IntegrityError, _Raced):
            now = self._head(dot, branch)  # after the failed transaction, on a new connection
            if now != new:
                raise Conflict(f"{dot} branch {branch} moved meanwhile (it is now at "
                               f"{now.hex()[:12] if now else 'nothing'}): pull first") from None

    def _verify(self, dot: Dot, new: ObjectId) -> graph.Get:
        """Check that commit ``new`` and its whole closure belong to the dot (once per
        commit: verified ones are remembered), before a ref names it."""
        get = self.getter(dot)
        if self.lacking(dot, [new]) or not self._is_commit(get, new):
            raise NotFound(f"{dot} has no commit {new.hex()[:16]}: push its objects first")
        if not self._present(verified, [new], dot):
            fresh = commits_between(get, new, _Verified(self, dot))
            needed = graph.delta(get, fresh)
            lost = self.lacking(dot, list(needed.kinds))
            if lost:
                raise Conflict(f"{dot} lacks {len(lost)} objects that commit "
                               f"{new.hex()[:12]} needs: push again")
            with self.tx() as c:
                if fresh:  # none: a push of the same commit verified them meanwhile
                    c.execute(self._insert_ignore(verified),
                              [{"dot_id": dot.id, "oid": x} for x in fresh])
                self._hold(c, dot)
        return get

    def set_tag(self, dot: Dot, tag: Tag, old: ObjectId | None) -> None:
        """Make tag ``tag.name``, or move it from ``old`` (compare-and-swap): its commit and
        all it needs must belong to the dot. A tag already naming that commit is success."""
        check_new_tag_name(tag.name)
        check_tag_fields(tag.message, tag.tagger)
        current = self._tag_head(dot, tag.name)
        if current == tag.commit:
            return
        if current != old:
            raise Conflict(f"{dot} tag {tag.name} names commit "
                           f"{current.hex()[:12] if current else 'nothing'}, not the "
                           f"{old.hex()[:12] if old else 'nothing'} expected")
        self._verify(dot, tag.commit)
        row = {"head": tag.commit, "message": tag.message, "tagger": tag.tagger,
               "ts_ns": tag.ts_ns}
        try:
            with self.tx() as c:
                if current is None:
                    c.execute(tags.insert().values(dot_id=dot.id, name=tag.name, **row))
                elif c.execute(tags.update().where(
                        tags.c.dot_id == dot.id, tags.c.name == tag.name,
                        tags.c.head == current).values(**row)).rowcount != 1:
                    raise _Raced
                self._hold(c, dot)
        except (sa.exc.IntegrityError, _Raced):
            if self._tag_head(dot, tag.name) != tag.commit:
                raise Conflict(f"{dot} tag {tag.name} moved meanwhile") from None

    def _tag_head(self, dot: Dot, name: str) -> ObjectId | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(tags.c.head).where(
                tags.c.dot_id == dot.id, tags.c.name == name)).first()
        return ObjectId(bytes(row[0])) if row else None

    @staticmethod
    def _hold(c: sa.Connection, dot: Dot) -> None:
        """In a transaction that just added rows for ``dot``: fail if the dot was deleted
        meanwhile (dm hub user rm --with-dots during a push), else keep it until commit.
        Rows left under a deleted dot's id would belong to a later dot given that id.
        After a write, SQLite's one writer makes this hold; PostgreSQL needs FOR SHARE."""
        if c.execute(sa.select(dots.c.id).where(dots.c.id == dot.id)
                     .with_for_update(read=True)).first() is None:
            raise NotFound(f"the hub has no dot {dot} any more")

    def _head(self, dot: Dot, branch: str) -> ObjectId | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(branches.c.head).where(
                branches.c.dot_id == dot.id, branches.c.name == branch)).first()
        return ObjectId(bytes(row[0])) if row else None

    @staticmethod
    def _is_commit(get: graph.Get, oid: ObjectId) -> bool:
        try:
            Commit.decode(get(oid))
        except Corrupt:
            return False
        return True


class _Collected(Exception):
    """A receive found objects it counted on without their index rows (gc took them)."""

    def __init__(self, gone: set[ObjectId]) -> None:
        super().__init__(f"{len(gone)} objects collected meanwhile")
        self.gone = gone


class _Exists(Exception):
    """A fork's name is taken."""


class _Raced(Exception):
    """A branch's compare-and-swap found another head than the one read just before."""


class _Verified:
    """Membership test for commits already known to have their whole closure."""

    def __init__(self, store: HubStore, dot: Dot) -> None:
        self.store, self.dot = store, dot

    def __contains__(self, oid: object) -> bool:
        assert isinstance(oid, bytes)
        return bool(self.store._present(verified, [ObjectId(oid)], self.dot))

