"""Reading a hub without cloning: its dots, a dot's log, one commit (``dm list --remote``,
``dm log --remote``, ``dm branch --remote``). Every answer is a hostile one: its JSON is
held to local rules (names, sizes, counts), and each commit it tells of must hash to its
id, as if it had come as an object."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dotmesh.errors import Corrupt, InvalidName
from dotmesh.model.ids import ID_LEN, ObjectId, object_id
from dotmesh.model.names import check_name
from dotmesh.model.objects import MAGIC_COMMIT, MAX_NAME_BYTES, Commit
from dotmesh.model.tags import MAX_TAGS
from dotmesh.model.trees import Change
from dotmesh.remote.wire import BadTransfer

MAX_PAGE = 1000  # dots or commits one answer may hold
MAX_CHANGES = 10_000  # files one commit's diff may list
MAX_COLLABORATORS = 10_000
MAX_BRANCHES = 10_000
ACCESS = ("owner", "write", "read")
STATUSES = ("added", "removed", "changed")
MAX_PATH = 4096 * 4


@dataclass(frozen=True)
class DotSummary:
    """A dot as a hub's list tells it."""

    namespace: str
    name: str
    access: str  # the caller's: owner, write, read
    public: bool
    branches: dict[str, ObjectId]
    tags: int
    objects: int
    stored_bytes: int  # of its objects as the hub keeps them (compressed, each once)
    raw_bytes: int  # of its objects uncompressed (each once)
    collaborators: dict[str, str]  # name: read or write
    pushers: list[str]
    last_commit: tuple[str, ObjectId, Commit] | None  # branch, id, commit

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        last = None
        if self.last_commit is not None:
            branch, oid, cm = self.last_commit
            last = {"branch": branch, "id": oid.hex(), "message": cm.message,
                    "author": cm.author, "timestamp_ns": cm.timestamp_ns}
        return {"namespace": self.namespace, "name": self.name, "access": self.access,
                "public": self.public, "branches": {b: h.hex() for b, h in self.branches.items()},
                "tags": self.tags, "objects": self.objects, "stored_bytes": self.stored_bytes,
                "raw_bytes": self.raw_bytes, "collaborators": self.collaborators,
                "pushers": self.pushers, "last_commit": last}


@dataclass(frozen=True)
class CommitView:
    """One commit as a hub tells it, with the files it changed against its first parent."""

    id: ObjectId
    commit: Commit
    against: ObjectId | None
    changes: list[Change]
    truncated: bool


def _bad(where: str, what: str) -> BadTransfer:
    return BadTransfer(f"{where} answered with {what}")


def _int(x: object, where: str, what: str, high: int = 1 << 62) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= high:
        raise _bad(where, f"a malformed {what}")
    return x


def _dict(x: object, where: str, what: str, most: int) -> dict[Any, Any]:
    if not isinstance(x, dict) or len(x) > most:
        raise _bad(where, f"a malformed {what}")
    return x


def _list(x: object, where: str, what: str, most: int) -> list[Any]:
    if not isinstance(x, list) or len(x) > most:
        raise _bad(where, f"a malformed {what}")
    return x


def hex_id(x: object, where: str, what: str = "commit id") -> ObjectId:
    if not isinstance(x, str) or len(x) != 2 * ID_LEN:
        raise _bad(where, f"a malformed {what}")
    try:
        raw = bytes.fromhex(x)
    except ValueError:
        raise _bad(where, f"a malformed {what}") from None
    if len(raw) != ID_LEN:
        raise _bad(where, f"a malformed {what}")
    return ObjectId(raw)


def _name(x: object, where: str, what: str) -> str:
    if not isinstance(x, str):
        raise _bad(where, f"a malformed {what}")
    try:
        return check_name(x, what)
    except InvalidName as e:
        raise _bad(where, f"a {what} named badly: {e}") from None


def parse_commit(obj: object, where: str) -> tuple[ObjectId, Commit]:
    """A commit told as JSON (id, parents, message, author, timestamp_ns, metadata,
    subdots): held to the rules of a commit object, and its canonical bytes must hash to
    its id."""
    d = _dict(obj, where, "commit", 64)
    oid = hex_id(d.get("id"), where)
    fields = {k: d.get(k) for k in ("parents", "subdots", "message", "author",
                                     "timestamp_ns", "metadata")}
    try:
        cm = Commit.decode(MAGIC_COMMIT + b"\n" + json.dumps(fields).encode())
        same = object_id(cm.encode()) == oid
    except (Corrupt, ValueError, TypeError, RecursionError):
        raise _bad(where, f"a malformed commit {oid.hex()[:12]}") from None
    if not same:
        raise _bad(where, f"a commit that is not {oid.hex()[:12]}")
    return oid, cm


def parse_dots(answer: dict[str, Any], where: str) -> tuple[list[DotSummary], str | None]:
    """A page of GET /api/v1/dots: the dots, and the name to ask ``after`` next."""
    from dotmesh.remote.transport import parse_heads  # noqa: PLC0415 - it imports this

    out: list[DotSummary] = []
    for d in _list(answer.get("dots"), where, "list of dots", MAX_PAGE):
        d = _dict(d, where, "dot", 64)
        ns, name = _name(d.get("namespace"), where, "namespace"), _name(
            d.get("name"), where, "dot name")
        access = d.get("access")
        if access not in ACCESS:
            raise _bad(where, f"a malformed access for {ns}/{name}")
        public = d.get("public")
        if not isinstance(public, bool):
            raise _bad(where, f"a malformed public flag for {ns}/{name}")
        heads = parse_heads(_dict(d.get("branches"), where, "branch list", MAX_BRANCHES),
                            where)
        roles = _dict(d.get("collaborators"), where, "collaborator list", MAX_COLLABORATORS)
        collaborators: dict[str, str] = {}
        for user, role in roles.items():
            if role not in ("read", "write"):
                raise _bad(where, f"a malformed role for {ns}/{name}")
            collaborators[_name(user, where, "user name")] = role
        pushers = [_name(u, where, "user name") for u in _list(
            d.get("pushers"), where, "list of pushers", MAX_COLLABORATORS + 1)]
        last = None
        if d.get("last_commit") is not None:
            oid, cm = parse_commit(d["last_commit"], where)
            branch = d["last_commit"].get("branch")
            if branch not in heads or heads[branch] != oid:
                raise _bad(where, f"a last commit of {ns}/{name} no branch has")
            last = (branch, oid, cm)
        out.append(DotSummary(
            ns, name, access, public, heads, _int(d.get("tags"), where, "tag count", MAX_TAGS),
            _int(d.get("objects"), where, "object count"),
            _int(d.get("stored_bytes"), where, "size"), _int(d.get("raw_bytes"), where, "size"),
            collaborators, pushers, last))
    following = answer.get("next")
    if following is not None:
        ns, slash, name = following.partition("/") if isinstance(following, str) else ("", "",
                                                                                       "")
        if not slash or not out:
            raise _bad(where, "a malformed next page")
        following = f"{_name(ns, where, 'namespace')}/{_name(name, where, 'dot name')}"
    return out, following


def parse_log(answer: dict[str, Any], where: str,
              limit: int) -> tuple[list[tuple[ObjectId, Commit]], ObjectId | None]:
    """A page of a dot's log: at most ``limit`` commits, each the first parent of the one
    before; and the commit to ask ``after`` next (the last one, if the page is not the
    end)."""
    out = [parse_commit(c, where) for c in _list(answer.get("commits"), where,
                                                 "list of commits", limit)]
    for (_, child), (parent, _) in zip(out, out[1:], strict=False):
        if child.parents[:1] != (parent,):
            raise _bad(where, "a log whose commits do not follow first parents")
    following = answer.get("next")
    if following is None:
        return out, None
    oid = hex_id(following, where)
    if not out or out[-1][0] != oid or not out[-1][1].parents:
        raise _bad(where, "a malformed next page")
    return out, oid


def parse_commit_view(answer: dict[str, Any], where: str, want: ObjectId) -> CommitView:
    oid, cm = parse_commit(answer, where)
    if oid != want:
        raise _bad(where, f"another commit than {want.hex()[:12]}")
    diff = _dict(answer.get("diff"), where, "diff", 8)
    against = diff.get("against")
    parent = hex_id(against, where) if against is not None else None
    if parent != (cm.parents[0] if cm.parents else None):
        raise _bad(where, "a diff against another commit than the first parent")
    truncated = diff.get("truncated")
    if not isinstance(truncated, bool):
        raise _bad(where, "a malformed diff")
    changes: list[Change] = []
    for ch in _list(diff.get("changes"), where, "diff", MAX_CHANGES):
        ch = _dict(ch, where, "change", 8)
        sub, status, path = ch.get("subdot"), ch.get("status"), ch.get("path")
        if sub not in cm.subdots and (parent is None or not isinstance(sub, str)):
            raise _bad(where, "a change in a subdot the commit does not have")
        if (status not in STATUSES or not isinstance(path, str) or not path
                or len(path) > MAX_PATH or path.startswith("/") or ".." in path.split("/")
                or any(len(p.encode()) > MAX_NAME_BYTES for p in path.split("/"))):
            raise _bad(where, "a malformed change")
        assert isinstance(sub, str)
        changes.append(Change(_name(sub, where, "subdot name"), status, path,
                              _int(ch.get("old_size"), where, "size"),
                              _int(ch.get("new_size"), where, "size")))
    return CommitView(oid, cm, parent, changes, truncated)
