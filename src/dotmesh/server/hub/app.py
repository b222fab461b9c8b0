"""``dm hub serve``: the hub's HTTP API (described in ``openapi.yaml`` beside this file).

Each route authenticates (HTTP Basic: user name and API key), parses, calls one method of
:class:`HubStore` on a worker thread and answers; an error answers with the HTTP status its
class carries (``errors.py``). Object batches travel as ``application/octet-stream`` in the pack
format; id lists as concatenated 32-byte ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from dotmesh.errors import DotmeshError, Forbidden, NotFound, TooLarge, Unauthorized, UsageError
from dotmesh.model.ids import ID_LEN, ObjectId
from dotmesh.model.names import DEFAULT_BRANCH, check_name
from dotmesh.model.tags import Tag
from dotmesh.remote.wire import MAX_BATCH, decode, encode
from dotmesh.server import hub
from dotmesh.server.hub.browse import LOG_LIMIT, LOG_MAX, commit, commit_view, iso, log_page, newest
from dotmesh.server.hub.config import HubConfig
from dotmesh.server.hub.storage import Dot, HubStore, check_key_id
from dotmesh.server.web.hub import hub_routes
from dotmesh.server.web.pages import BaselineHeaders

OCTETS = "application/octet-stream"
FETCH_LIMIT = 32 << 20  # bytes of objects per fetch answer; the client asks for the rest
# Requests with a body handled at once by one process (the others wait their turn): each
# holds up to MAX_BATCH bytes, and decoding one may take a few times its largest object, so
# this is what bounds a hub's memory whatever pushers send (docs/format.md).
BODIES_AT_ONCE = 2
BODIES_PER_USER = 2
BODY_IDLE = 30.0  # seconds a client may send nothing in the middle of a body
LIST_LIMIT = 100  # dots of a GET /api/v1/dots page, unless asked
LIST_MAX = 500
FORK_BODY = 4096


def openapi() -> str:
    return resources.files(hub).joinpath("openapi.yaml").read_text()


def ids_of(data: bytes) -> list[ObjectId]:
    if len(data) % ID_LEN:
        raise UsageError(f"an id list must be a multiple of {ID_LEN} bytes")
    return [ObjectId(data[i:i + ID_LEN]) for i in range(0, len(data), ID_LEN)]


def hex_id(text: str) -> ObjectId:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != ID_LEN:
        raise UsageError(f"bad commit id {text!r}")
    return ObjectId(raw)


def number(q: Any, name: str, default: int, most: int) -> int:
    try:
        return max(1, min(int(q.get(name, str(default))), most))
    except ValueError:
        raise UsageError(f"{name} must be a number") from None


def json_body(body: bytes, expected: str) -> dict[str, Any]:
    try:
        req = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        req = None
    if not isinstance(req, dict):
        raise UsageError(f"expected {expected}")
    return req


Handler = Callable[[Request, str], Awaitable[Response]]


def create_app(store: HubStore, secret: bytes | None = None) -> Starlette:
    """The API under /api/v1 and the web UI's pages at / (``server/web/hub.py``); ``secret``
    signs the pages' session cookies (default: a new one, good for this process only)."""
    def user_of(request: Request, anonymous: bool = False) -> str | None:
        """Who the request's API key belongs to; None for a request without one to a route
        that serves ``anonymous`` callers (public dots)."""
        auth = request.headers.get("authorization", "")
        if anonymous and not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "basic" or not token:
            raise Unauthorized("this hub needs an API key: dm remote add NAME USER@HOST")
        try:
            name, sep, key = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # also a header that is not ASCII
            raise Unauthorized("malformed Authorization header") from None
        if not sep:
            raise Unauthorized("malformed Authorization header: expected USER:API_KEY")
        store.authenticate(name, key)
        return name

    handling = asyncio.Semaphore(BODIES_AT_ONCE)
    per_user: dict[str, asyncio.Semaphore] = {}

    def route(path: str, method: str, fn: Callable[..., Any],
              anonymous: bool = False) -> Route:
        """Wrap a handler: authenticate, run it on a worker thread, map errors.
        ``anonymous``: a caller without a key gets there too, as user None (a GET that
        reads public dots)."""
        async def endpoint(request: Request) -> Response:
            try:
                # before reading a body
                user = await run_in_threadpool(user_of, request, anonymous)
                if method not in ("POST", "PUT"):
                    return await run_in_threadpool(fn, user, request.path_params, b"",
                                                   request.query_params)
                # A user reads BODIES_PER_USER bodies at once (so nobody's slow uploads hold
                # up anyone else's), and a process handles BODIES_AT_ONCE read bodies. Callers
                # without a key (public fetches) share one allowance: " " is no user's name.
                caller = user if user is not None else " "
                mine = per_user.setdefault(caller, asyncio.Semaphore(BODIES_PER_USER))
                async with mine:
                    body = await _body(request)
                    async with handling:
                        return await run_in_threadpool(fn, user, request.path_params, body,
                                                       request.query_params)
            except DotmeshError as e:
                # Not "Basic": a browser would ask for the key in a prompt and then send it
                # with every request, forged cross-site ones too. dm and curl -u send
                # Basic credentials unasked.
                headers = {"WWW-Authenticate": 'DMKey realm="dm hub"'} if isinstance(
                    e, Unauthorized) else None
                return JSONResponse({"error": str(e)}, status_code=e.http_status,
                                    headers=headers)
            except ClientDisconnect:  # the client hung up mid-body: nobody to answer
                return Response(status_code=400)
        return Route(path, endpoint, methods=[method])

    def whoami(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        return JSONResponse({"name": user})

    def show(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        return JSONResponse(store.describe(store.dot_for(user, p["ns"], p["dot"])))

    def drop(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        check_name(p["ns"], "namespace")
        check_name(p["dot"], "dot name")
        if user != p["ns"]:
            raise Forbidden(f"only {p['ns']} may delete {p['ns']}/{p['dot']}")
        store.remove_dot(p["ns"], p["dot"])
        return JSONResponse({"deleted": f"{p['ns']}/{p['dot']}"})

    def lacking(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        ids = ids_of(body)
        try:
            dot: Dot | None = store.dot_for(user, p["ns"], p["dot"])
        except NotFound:
            dot = None  # its owner is about to push it: it lacks everything
        missing = store.lacking(dot, ids)
        return Response(b"".join(i for i in ids if i in missing), media_type=OCTETS)

    def receive(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"], create=True, write=True)
        records = decode(body, None, "the pusher", base=store.getter(dot))
        return JSONResponse({"received": len(records), "new": store.receive(dot, records)})

    def fetch(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"])
        if len(body) % (ID_LEN + 1):
            raise UsageError(f"a fetch lists {ID_LEN + 1}-byte (kind, id) pairs")
        want = {ObjectId(body[i + 1:i + 1 + ID_LEN]): body[i]
                for i in range(0, len(body), ID_LEN + 1)}
        return Response(encode(store.read(dot, want, FETCH_LIMIT)), media_type=OCTETS)

    def history(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"])
        limit = number(q, "limit", 1000, 10_000)
        have = {hex_id(h) for h in q.getlist("have")[:100]}
        return Response(encode(store.history(dot, hex_id(p["commit"]), limit, have)),
                        media_type=OCTETS)

    def set_ref(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"], create=True, write=True)
        try:
            req = json.loads(body)
            old = hex_id(req["old"]) if req.get("old") else None
            new = hex_id(req["new"])
            force = bool(req.get("force", False))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UsageError('expected {"old": hex or null, "new": hex, "force": '
                             'bool}') from None
        store.set_ref(dot, p["branch"], old, new, force)
        return JSONResponse({"branch": p["branch"], "head": new.hex()})

    def set_tag(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"], write=True)
        try:
            req = json.loads(body)
            old = hex_id(req["old"]) if req.get("old") else None
            tag = Tag.from_json(p["tag"], req)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UsageError('expected {"old": hex or null, "commit": hex, "message": text, '
                             '"tagger": text, "ts_ns": int}') from None
        store.set_tag(dot, tag, old)
        return JSONResponse({"tag": tag.name, "commit": tag.commit.hex()})

    def collaborator(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        if user != p["ns"]:
            raise Forbidden(f"only {p['ns']} may add collaborators to {p['ns']}/{p['dot']}")
        role = json_body(body, '{"role": "read" or "write"} (or nothing: write)').get(
            "role", "write")
        if role not in ("read", "write"):
            raise UsageError(f"a collaborator's role is read or write, not {str(role)[:20]!r}")
        store.add_collaborator(p["ns"], p["dot"], p["user"], role)
        return JSONResponse({"collaborator": p["user"], "role": role})

    def collaborator_rm(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        if user != p["ns"]:
            raise Forbidden(f"only {p['ns']} may remove collaborators of "
                            f"{p['ns']}/{p['dot']}")
        store.remove_collaborator(p["ns"], p["dot"], p["user"])
        return JSONResponse({"removed": p["user"]})

    def collaborators(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"])
        roles = store.roles_of([dot.id]).get(dot.id, {})
        return JSONResponse({"dot": str(dot), "owner": dot.namespace,
                             "collaborators": sorted(roles), "roles": roles})

    def publicity(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        if user != p["ns"]:
            raise Forbidden(f"only {p['ns']} may make {p['ns']}/{p['dot']} public or not")
        public = json_body(body, '{"public": true or false}').get("public")
        if not isinstance(public, bool):
            raise UsageError('expected {"public": true or false}')
        store.set_public(p["ns"], p["dot"], public)
        return JSONResponse({"dot": f"{p['ns']}/{p['dot']}", "public": public})

    def listing(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        after = None
        if q.get("after"):
            ns, slash, name = q["after"].partition("/")
            if not slash:
                raise UsageError("after names a dot: NAMESPACE/DOT")
            after = (check_name(ns, "namespace"), check_name(name, "dot name"))
        limit = number(q, "limit", LIST_LIMIT, LIST_MAX)
        found = store.visible(user, after, limit)
        out = store.summaries(found)
        for (dot, _), summary in zip(found, out, strict=True):
            heads = {b: hex_id(h) for b, h in summary["branches"].items()}
            summary["last_commit"] = newest(store.getter(dot), heads)
        last = found[-1][0] if len(found) == limit else None
        return JSONResponse({"dots": out, "next": str(last) if last else None})

    def commit_log(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"])
        limit = number(q, "limit", LOG_LIMIT, LOG_MAX)
        get = store.getter(dot)
        ref = q.get("ref") or DEFAULT_BRANCH
        if q.get("after"):
            after = hex_id(q["after"])
            parents = commit(get, after).parents
            start = parents[0] if parents else None
        else:
            start = store.resolve(dot, ref)
        commits, following = log_page(get, start, limit)
        return JSONResponse({"dot": str(dot), "ref": ref, "commits": commits,
                             "next": following})

    def one_commit(user: str | None, p: dict[str, str], body: bytes, q: Any) -> Response:
        dot = store.dot_for(user, p["ns"], p["dot"])
        return JSONResponse(commit_view(store.getter(dot), hex_id(p["commit"])))

    def fork(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        source = store.dot_for(user, p["ns"], p["dot"])
        name = json_body(body, '{"name": the new dot\'s name (or nothing: the same)}').get(
            "name") or source.name
        if not isinstance(name, str):
            raise UsageError("the fork's name is a dot name")
        new = store.fork(user, source, check_name(name, "dot name"))
        return JSONResponse({"dot": str(new), "forked_from": str(source)}, status_code=201)

    def keys(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        return JSONResponse({"keys": [{"id": kid, "created": iso(ns)}
                                      for kid, ns in store.list_keys(user)]})

    def key_new(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        new = store.new_key(user)
        return JSONResponse({"id": new.id, "created": iso(new.created_ns),
                             "api_key": new.key}, status_code=201)

    def key_revoke(user: str, p: dict[str, str], body: bytes, q: Any) -> Response:
        kid = check_key_id(p["id"])
        store.revoke_key(kid, user)
        return JSONResponse({"revoked": kid})

    async def spec(request: Request) -> Response:
        return Response(openapi(), media_type="application/yaml")

    base = "/api/v1/dots/{ns}/{dot}"
    return Starlette(routes=[
        Route("/api/v1/openapi.yaml", spec, methods=["GET"]),
        route("/api/v1/user", "GET", whoami),
        route("/api/v1/user/keys", "GET", keys),
        route("/api/v1/user/keys", "POST", key_new),
        route("/api/v1/user/keys/{id}", "DELETE", key_revoke),
        route("/api/v1/dots", "GET", listing, anonymous=True),
        route(base, "GET", show, anonymous=True),
        route(base, "DELETE", drop),
        route(base + "/lacking", "POST", lacking),
        route(base + "/objects", "POST", receive),
        route(base + "/fetch", "POST", fetch, anonymous=True),
        route(base + "/history/{commit}", "GET", history, anonymous=True),
        route(base + "/log", "GET", commit_log, anonymous=True),
        route(base + "/commits/{commit}", "GET", one_commit, anonymous=True),
        route(base + "/fork", "POST", fork),
        route(base + "/public", "PUT", publicity),
        route(base + "/branches/{branch:path}", "PUT", set_ref),
        route(base + "/tags/{tag:path}", "PUT", set_tag),
        route(base + "/collaborators", "GET", collaborators, anonymous=True),
        route(base + "/collaborators/{user}", "PUT", collaborator),
        route(base + "/collaborators/{user}", "DELETE", collaborator_rm),
        Mount("/", routes=hub_routes(store, secret or secrets.token_bytes(32))),  # web pages
    ], middleware=[Middleware(BaselineHeaders)])


def app_from_env() -> Starlette:
    """The app of one of several worker processes: its storage comes from DM_HUB_CONFIG
    (JSON with the keys of ``dm hub``'s config), set by ``dm hub serve --workers``."""

    supervisor = int(os.environ.get("DM_HUB_SUPERVISOR", "0"))
    if supervisor and supervisor != os.getpid():
        _die_with(supervisor)
    store = HubConfig(json.loads(os.environ["DM_HUB_CONFIG"])).store()
    return create_app(store, store.web_secret())


def _die_with(parent: int) -> None:
    """Make this worker process end when ``dm hub serve`` does, even by kill -9: uvicorn's
    workers would go on serving, and the next serve, finding the data folder's lock free,
    would delete their temporary files while they write them."""
    import ctypes  # noqa: PLC0415

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGKILL)


async def _body(request: Request) -> bytes:
    """The request body, refused past MAX_BATCH bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BATCH:
        raise TooLarge(f"request body of {declared} bytes is over the {MAX_BATCH}-byte limit")
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), BODY_IDLE)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise UsageError(f"the request body stalled for {BODY_IDLE:.0f} s") from None
        size += len(chunk)
        if size > MAX_BATCH:
            raise TooLarge(f"request body is over the {MAX_BATCH}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
