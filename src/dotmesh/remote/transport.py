"""One dot on a remote, as push, pull and clone see it: a hub (HTTP) or an S3 bucket.

The contract, which one test suite checks for both:
- ``heads()``: the dot's branches and their head commits ({} if the dot is not there);
- ``lacking(ids)``: which of ``ids`` the dot lacks (any number of ids);
- ``send(records)``: store one batch of objects (idempotent; a rerun of a killed push sends
  only what ``lacking`` still names); ``can_delta`` says whether file lists may travel as
  deltas against ones the dot has, ``checks_objects`` whether the remote checks each object
  against its id before it keeps it (else the pusher checks what it sends);
- ``fetch(want)``: the objects asked for, verified (hash, kind, size, structure);
- ``history(head)``: commit ``head`` and its ancestors there, verified;
- ``set_ref(branch, old, new, force)``: compare-and-swap of a branch; Conflict if it moved,
  or (without force) if ``new`` does not descend from it;
- ``tags()``: the dot's tags, held to local rules; ``set_tag(tag, old, force)``: make or
  (with force) move a tag whose commit the dot has; Conflict if it names another commit
  than ``old`` (None: if it exists at all).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dotmesh.errors import Conflict, DotmeshError, InvalidName, NotFound, error_for_status
from dotmesh.model.graph import check_fast_forward, walk_commits
from dotmesh.model.ids import ID_LEN, ObjectId
from dotmesh.model.names import check_branch, check_name, ref_key, ref_of_key
from dotmesh.model.objects import KIND_COMMIT, Commit
from dotmesh.model.tags import MAX_MESSAGE, MAX_TAGS, Tag
from dotmesh.remote.blobs import Blobs
from dotmesh.remote.packed import decode_index, encode_index, first_within, read_records, write_pack
from dotmesh.remote.wire import MAX_BATCH, BadTransfer, Record, decode, encode
from dotmesh.store.packs import PackLocation

if TYPE_CHECKING:
    from dotmesh.remote.hubread import CommitView, DotSummary

LACKING_BATCH = 50_000
FETCH_BATCH_BYTES = 16 << 20
MAX_ANSWER = MAX_BATCH  # bytes of one answer of a hub
MAX_JSON_ANSWER = 16 << 20
MAX_REF_BLOB = 4096
MAX_TAG_BLOB = 12 * MAX_MESSAGE + 4096  # a message JSON-escaped: 12 bytes a character at most
MAX_INDEX_BLOB = 64 << 20  # an S3 pack's index: 50 bytes per object of a batch


class Unreachable(DotmeshError):
    """The remote did not answer, or answered something that is not its protocol."""

    exit_code = 14


class Transport(Protocol):
    where: str  # for messages: "hub (alice/app)"
    can_delta: bool
    checks_objects: bool

    def heads(self) -> dict[str, ObjectId]: ...
    def lacking(self, ids: list[ObjectId]) -> set[ObjectId]: ...
    def send(self, records: list[Record]) -> None: ...
    def fetch(self, want: dict[ObjectId, int]) -> dict[ObjectId, Record]: ...
    def fetch_iter(self, want: dict[ObjectId, int]) -> Iterator[list[Record]]: ...
    def history(self, head: ObjectId, have: Sequence[ObjectId]) -> list[Record]: ...
    def set_ref(self, branch: str, old: ObjectId | None, new: ObjectId,
                force: bool) -> None: ...
    def tags(self) -> dict[str, Tag]: ...
    def set_tag(self, tag: Tag, old: ObjectId | None) -> None: ...
    def close(self) -> None: ...


def printable(text: str) -> str:
    """A remote's words, safe to print on a terminal (no escape sequences)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def parse_heads(branches: dict[Any, Any], where: str) -> dict[str, ObjectId]:
    """Branch names and heads as a remote states them, held to local rules."""
    out: dict[str, ObjectId] = {}
    for name, head in branches.items():
        try:
            check_branch(name)
        except InvalidName as e:
            raise BadTransfer(f"{where} has a branch named badly: {e}") from None
        if not isinstance(head, str) or len(head) != 2 * ID_LEN:
            raise BadTransfer(f"{where} has a malformed head for branch {name}")
        try:
            raw = bytes.fromhex(head)
        except ValueError:
            raise BadTransfer(f"{where} has a malformed head for branch {name}") from None
        if len(raw) != ID_LEN:  # fromhex skips spaces: 64 characters may be fewer bytes
            raise BadTransfer(f"{where} has a malformed head for branch {name}")
        out[name] = ObjectId(raw)
    return out


def parse_tags(listed: object, where: str) -> dict[str, Tag]:
    """Tags as a remote states them ({name: {commit, message, tagger, ts_ns}}), held to
    local rules: one badly made tag refuses the whole answer, as a bad branch does."""
    if not isinstance(listed, dict):
        raise BadTransfer(f"{where} listed its tags malformed")
    if len(listed) > MAX_TAGS:
        raise BadTransfer(f"{where} has over {MAX_TAGS} tags")
    out: dict[str, Tag] = {}
    for name, obj in listed.items():
        try:
            out[name] = Tag.from_json(name, obj)
        except InvalidName as e:
            raise BadTransfer(f"{where} has a tag made badly: {e}") from None
    return out


def check_history(records: list[Record], head: ObjectId, where: str) -> list[Record]:
    """Commits sent as ``head``'s history: all commits, ``head`` among them, each reachable
    from it through the others (nothing unasked for)."""
    by_id: dict[ObjectId, Record] = {}
    for r in records:
        if r.kind != KIND_COMMIT:
            raise BadTransfer(f"{where} sent a non-commit as history")
        by_id[r.oid] = r
    if head not in by_id:
        raise BadTransfer(f"{where} did not send commit {head.hex()[:12]}")
    reached = walk_commits(lambda c: by_id[c].raw(), [head],
                           stop=lambda c: c not in by_id)
    if sum(1 for _ in reached) != len(by_id):
        raise BadTransfer(f"{where} sent commits that are not in {head.hex()[:12]}'s history")
    return list(by_id.values())


def fetch_answers(want: dict[ObjectId, int], where: str,
                  ask: Callable[[dict[ObjectId, int]], bytes]) -> Iterator[list[Record]]:
    """Ask (``ask(todo) -> batch bytes``) until every wanted object came, yielding each
    answer's records as they come (verified against what was asked for): what a caller holds
    at once is one answer, whatever a remote sends."""
    todo = dict(want)
    while todo:
        records = decode(ask(todo), todo, where)
        if not records:
            raise BadTransfer(f"{where} sent none of the {len(todo)} objects asked for")
        for r in records:
            todo.pop(r.oid, None)
        yield records


def collect(answers: Iterable[list[Record]]) -> dict[ObjectId, Record]:
    return {r.oid: r for answer in answers for r in answer}


# ------------------------------------------------------------------ hub


class HubTransport:
    """A dot on a hub, over HTTP(S) with httpx; HTTP statuses become dm's errors."""

    can_delta = True
    checks_objects = True  # the hub decodes and hashes every object it is sent (wire.decode)

    def __init__(self, url: str, user: str, key: str, remote_dot: str,
                 verify: bool | str = True) -> None:
        """``remote_dot`` is NAMESPACE/DOT ("" when only asking who the key belongs to).
        Without a ``user`` no key is sent: the hub answers for public dots only."""
        import httpx  # noqa: PLC0415

        self.url, self.remote_dot = url.rstrip("/"), remote_dot
        self.where = f"the hub at {self.url} ({remote_dot})"
        self.http = httpx.Client(base_url=self.url, auth=(user, key) if user else None,
                                 verify=verify,
                                 timeout=httpx.Timeout(120, connect=10))
        self._httpx = httpx
        self._parent_of: dict[ObjectId, ObjectId] = {}  # a log page's last commit: its parent

    def _req(self, method: str, path: str, limit: int = MAX_ANSWER, **kw: Any) -> bytes:
        """The answer's body, read up to ``limit`` bytes (a hub cannot make the client hold
        more); HTTP errors become dm's errors."""
        try:
            with self.http.stream(method, path, **kw) as r:
                body = bytearray()
                for part in r.iter_bytes():
                    body += part
                    if len(body) > limit:
                        raise BadTransfer(f"{self.where} answered with more than {limit} "
                                          "bytes")
        except self._httpx.HTTPError as e:
            raise Unreachable(f"cannot reach {self.where}: {e}") from None
        if r.status_code >= 400:
            try:
                msg = printable(str(json.loads(body)["error"]).splitlines()[0][:500])
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                msg = f"HTTP {r.status_code}: {bytes(body[:200])!r}"
            raise (error_for_status(r.status_code) or Unreachable)(f"{self.where}: {msg}")
        return bytes(body)

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            got = json.loads(self._req(method, path, MAX_JSON_ANSWER, **kw))
        except (ValueError, RecursionError):
            got = None
        if not isinstance(got, dict):
            raise BadTransfer(f"{self.where} answered something that is not a JSON object")
        return got

    def _dot(self, suffix: str = "") -> str:
        ns, _, name = self.remote_dot.partition("/")
        return f"/api/v1/dots/{ns}/{name}{suffix}"

    def whoami(self) -> str:
        name = self._json("GET", "/api/v1/user").get("name")
        if not isinstance(name, str):
            raise BadTransfer(f"{self.where} did not say whose key this is")
        try:
            return check_name(name, "user name")
        except InvalidName as e:
            raise BadTransfer(f"{self.where} named the key's user badly: {e}") from None

    def _describe(self) -> dict[str, Any]:
        try:
            return self._json("GET", self._dot())
        except NotFound:
            return {}

    def heads(self) -> dict[str, ObjectId]:
        branches = self._describe().get("branches", {})
        if not isinstance(branches, dict):
            raise BadTransfer(f"{self.where} described the dot malformed")
        return parse_heads(branches, self.where)

    def tags(self) -> dict[str, Tag]:
        return parse_tags(self._describe().get("tags", {}), self.where)  # none: older hub

    def lacking(self, ids: list[ObjectId]) -> set[ObjectId]:
        out: set[ObjectId] = set()
        for i in range(0, len(ids), LACKING_BATCH):
            batch = ids[i:i + LACKING_BATCH]
            data = self._req("POST", self._dot("/lacking"), content=b"".join(batch),
                             headers={"content-type": "application/octet-stream"})
            if len(data) % ID_LEN:
                raise BadTransfer(f"{self.where} sent a malformed id list")
            found = {data[j:j + ID_LEN] for j in range(0, len(data), ID_LEN)}
            if not found <= set(batch):
                raise BadTransfer(f"{self.where} named objects that were not asked about")
            out.update(ObjectId(o) for o in found)  # each one asked about
        return out

    def send(self, records: list[Record]) -> None:
        self._req("POST", self._dot("/objects"), content=encode(records),
                  headers={"content-type": "application/octet-stream"})

    def fetch(self, want: dict[ObjectId, int]) -> dict[ObjectId, Record]:
        return collect(self.fetch_iter(want))

    def fetch_iter(self, want: dict[ObjectId, int]) -> Iterator[list[Record]]:
        def ask(todo: dict[ObjectId, int]) -> bytes:
            body = b"".join(bytes([k]) + oid for oid, k in todo.items())
            return self._req("POST", self._dot("/fetch"), content=body, headers={
                "content-type": "application/octet-stream"})
        return fetch_answers(want, self.where, ask)

    def history(self, head: ObjectId, have: Sequence[ObjectId]) -> list[Record]:
        params = [("have", h.hex()) for h in have[:50]]
        data = self._req("GET", self._dot(f"/history/{head.hex()}"), params=params)
        return check_history(decode(data, None, self.where), head, self.where)

    def set_ref(self, branch: str, old: ObjectId | None, new: ObjectId, force: bool) -> None:
        self._json("PUT", self._dot(f"/branches/{branch}"), json={
            "old": old.hex() if old else None, "new": new.hex(), "force": force})

    def set_tag(self, tag: Tag, old: ObjectId | None) -> None:
        self._json("PUT", self._dot(f"/tags/{tag.name}"), json={
            **tag.to_json(), "old": old.hex() if old else None})

    # Reading the hub without cloning (remote/hubread.py checks every answer).
    def list_dots(self, most: int = 10_000) -> list[DotSummary]:
        """The dots the key's user may read (own, shared, public), by name, up to ``most``."""
        from dotmesh.remote import hubread  # noqa: PLC0415 - it imports this module

        out: list[DotSummary] = []
        seen: set[str] = set()
        after: str | None = None
        while len(out) < most:
            params = {"limit": str(min(hubread.MAX_PAGE, most - len(out)))}
            if after:
                params["after"] = after
            page, after = hubread.parse_dots(self._json("GET", "/api/v1/dots", params=params),
                                             self.where)
            if not seen.isdisjoint(str(d) for d in page) or len(
                    {str(d) for d in page}) != len(page):
                raise BadTransfer(f"{self.where} listed a dot twice")
            seen.update(str(d) for d in page)
            out.extend(page)
            if after is None:
                break
        return out[:most]

    def log(self, ref: str | None = None, limit: int = 50,
            after: ObjectId | None = None) -> tuple[list[tuple[ObjectId, Commit]],
                                                    ObjectId | None]:
        """A page of the dot's commits from ``ref`` (a branch, a tag, a commit id; None: the
        hub's default) back along first parents, or from the first parent of ``after``;
        and the commit to go on ``after`` (None: the end)."""
        from dotmesh.remote import hubread  # noqa: PLC0415

        limit = max(1, min(limit, hubread.MAX_PAGE))
        params = {"limit": str(limit)}
        if ref:
            params["ref"] = ref
        if after is not None:
            params["after"] = after.hex()
        got, following = hubread.parse_log(self._json("GET", self._dot("/log"), params=params),
                                           self.where, limit)
        known = self._parent_of.get(after) if after is not None else None
        if known is not None and (not got or got[0][0] != known):
            raise BadTransfer(f"{self.where} did not go on from the parent of "
                              f"{after.hex()[:12] if after else ''}")
        if following is not None:
            self._parent_of[following] = got[-1][1].parents[0]
        return got, following

    def commit(self, oid: ObjectId) -> CommitView:
        """Commit ``oid`` of the dot and the files it changed against its first parent."""
        from dotmesh.remote import hubread  # noqa: PLC0415

        return hubread.parse_commit_view(self._json("GET", self._dot(f"/commits/{oid.hex()}")),
                                         self.where, oid)

    def close(self) -> None:
        self.http.close()


# ------------------------------------------------------------------ S3


class S3Transport:
    """A dot in a bucket: ``dots/NAME/packs/*.pack`` with an ``.idx`` each (written after its
    pack: a pack without one is an interrupted upload, ignored), ``dots/NAME/refs/BRANCH``
    and ``dots/NAME/tags/TAG`` (JSON; ``fix/login`` is ``fix.login``), changed only by
    conditional writes. Indexes are immutable, so they are cached
    under ``cache``. The bucket is trusted as far as its users are: everything read from it is
    verified all the same."""

    can_delta = False
    checks_objects = False  # a bucket keeps what it is sent

    def __init__(self, blobs: Blobs, remote_dot: str, cache: Path) -> None:
        self.blobs, self.remote_dot, self.cache = blobs, remote_dot, cache
        self.where = f"bucket {blobs.describe()} ({remote_dot})"
        self.base = f"dots/{remote_dot}/"
        self._index: dict[ObjectId, PackLocation[str]] | None = None

    def index(self) -> dict[ObjectId, PackLocation[str]]:
        if self._index is None:
            self._index = {}
            self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
            for key in self.blobs.list(self.base + "packs/"):
                if not key.endswith(".idx"):
                    continue
                local = self.cache / key.replace("/", "_")
                try:
                    data = local.read_bytes()
                except FileNotFoundError:
                    data = self.blobs.get(key, MAX_INDEX_BLOB)
                    tmp = local.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, local)
                self._index.update(decode_index(key.removesuffix(".idx") + ".pack", data))
        return self._index

    def _refs(self, kind: str, limit: int) -> Iterator[tuple[str, bytes]]:
        """(name, value) of each ``refs/`` or ``tags/`` key."""
        for key in self.blobs.list(f"{self.base}{kind}/"):
            part = key.removeprefix(f"{self.base}{kind}/")
            if "/" in part:  # fix/login is fix.login: no other key may name it
                raise BadTransfer(f"{self.where} has a malformed key {key[:120]!r}")
            got = self.blobs.read_versioned(key, limit)
            if got is not None:
                yield ref_of_key(part), got[0]

    def heads(self) -> dict[str, ObjectId]:
        out: dict[str, ObjectId] = {}
        for branch, value in self._refs("refs", MAX_REF_BLOB):
            try:
                check_branch(branch)
            except InvalidName as e:
                raise BadTransfer(f"{self.where} has a branch named badly: {e}") from None
            out[branch] = _parse_ref(value, self.where)
        return out

    def tags(self) -> dict[str, Tag]:
        """As a hub's answer is: at most MAX_TAGS tags, MAX_JSON_ANSWER bytes of them."""
        out: dict[str, Tag] = {}
        read = 0
        for name, value in self._refs("tags", MAX_TAG_BLOB):
            read += len(value)
            if len(out) >= MAX_TAGS or read > MAX_JSON_ANSWER:
                raise BadTransfer(f"{self.where} has over {MAX_TAGS} tags or "
                                  f"{MAX_JSON_ANSWER} bytes of them")
            out[name] = self._parse_tag(name, value)
        return out

    def _parse_tag(self, name: str, value: bytes) -> Tag:
        try:
            listed = {name: json.loads(value)}
        except (ValueError, RecursionError):
            raise BadTransfer(f"{self.where} has a malformed tag {name[:80]!r}") from None
        return parse_tags(listed, self.where)[name]

    def lacking(self, ids: list[ObjectId]) -> set[ObjectId]:
        index = self.index()
        return {i for i in ids if i not in index}

    def send(self, records: list[Record]) -> None:
        key, locs = write_pack(self.blobs, self.base + "packs/", records)
        self.blobs.put(key.removesuffix(".pack") + ".idx", encode_index(locs))
        self.index().update(locs)

    def fetch(self, want: dict[ObjectId, int]) -> dict[ObjectId, Record]:
        return collect(self.fetch_iter(want))

    def fetch_iter(self, want: dict[ObjectId, int]) -> Iterator[list[Record]]:
        index = self.index()
        lost = [o for o in want if o not in index]
        if lost:
            raise NotFound(f"{self.where} has no object {lost[0].hex()[:16]}")

        def ask(todo: dict[ObjectId, int]) -> bytes:
            return encode(read_records(self.blobs, first_within(index, todo,
                                                                FETCH_BATCH_BYTES)))
        return fetch_answers(want, self.where, ask)

    def history(self, head: ObjectId, have: Sequence[ObjectId]) -> list[Record]:
        """Commit ``head`` and its ancestors, nearest first, up to about FETCH_BATCH_BYTES
        (the client asks again from the parents it still lacks), not past ``have``."""
        if not self._has_commit(head):
            raise NotFound(f"{self.where} has no commit {head.hex()[:12]}")
        out: list[Record] = []
        size = 0

        def get(c: ObjectId) -> bytes:
            nonlocal size
            rec = self._commit_record(c)
            out.append(rec)
            size += len(rec.payload)
            return rec.raw()
        skip = set(have)
        for _ in walk_commits(get, [head], order="breadth",
                              stop=lambda c: c in skip or not self._has_commit(c)):
            if size >= FETCH_BATCH_BYTES:  # what the commits before this one weigh
                break
        return check_history(out, head, self.where)

    def _has_commit(self, oid: ObjectId) -> bool:
        loc = self.index().get(oid)
        return loc is not None and loc.kind == KIND_COMMIT

    def _commit_record(self, oid: ObjectId) -> Record:
        """Commit ``oid``, read through the index and verified."""
        loc = self.index().get(oid)
        if loc is None or loc.kind != KIND_COMMIT:
            raise NotFound(f"{self.where} has no commit {oid.hex()[:12]}")
        (rec,) = decode(encode(read_records(self.blobs, {oid: loc})), {oid: KIND_COMMIT},
                        self.where)
        return rec

    def _commit(self, oid: ObjectId) -> bytes:
        return self._commit_record(oid).raw()

    def set_ref(self, branch: str, old: ObjectId | None, new: ObjectId, force: bool) -> None:
        """A conditional write; a ref already at ``new``, before or after losing the race to
        another pusher, is success (two pushes of one commit both succeed). Without
        ``force``, ``new`` must include the branch's head, as on a hub (its history is read
        from the bucket, through the index)."""
        key = f"{self.base}refs/{ref_key(branch)}"
        now = self.blobs.read_versioned(key, MAX_REF_BLOB)
        current = _parse_ref(now[0], self.where) if now else None
        if current == new:
            return
        if current != old:
            raise Conflict(f"{self.where} branch {branch} moved meanwhile: pull first")
        if current is not None and not force:
            check_fast_forward(self._commit, new, current,
                               f"{self.where} branch {branch}")
        try:
            self.blobs.put_if(key, json.dumps({"head": new.hex()}).encode(),
                              now[1] if now else None)
        except Conflict:
            again = self.blobs.read_versioned(key)
            if again is None or _parse_ref(again[0], self.where) != new:
                raise Conflict(f"{self.where} branch {branch} moved meanwhile: pull "
                               "first") from None

    def set_tag(self, tag: Tag, old: ObjectId | None) -> None:
        """A conditional write, as for a branch; the bucket must hold the tag's commit."""
        if not self._has_commit(tag.commit):
            raise NotFound(f"{self.where} has no commit {tag.commit.hex()[:12]}: push it "
                           "first")
        key = f"{self.base}tags/{ref_key(tag.name)}"
        now = self.blobs.read_versioned(key, MAX_TAG_BLOB)
        current = self._parse_tag(tag.name, now[0]).commit if now else None
        if current == tag.commit:
            return
        if current != old:
            raise Conflict(f"{self.where} tag {tag.name} names another commit meanwhile")
        try:
            self.blobs.put_if(key, json.dumps(tag.to_json()).encode(),
                              now[1] if now else None)
        except Conflict:
            raise Conflict(f"{self.where} tag {tag.name} moved meanwhile") from None

    def close(self) -> None:
        pass


def _parse_ref(data: bytes, where: str) -> ObjectId:
    try:
        head = bytes.fromhex(json.loads(data)["head"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BadTransfer(f"{where} has a malformed ref") from None
    if len(head) != ID_LEN:
        raise BadTransfer(f"{where} has a malformed ref")
    return ObjectId(head)
