"""What the hub's pages and ``dm ui``'s share: the Jinja templates, turning a handler into a
Starlette endpoint (the session cookie, the CSRF check of every POST, errors as pages with
their class's HTTP status), and the filters that make times and sizes readable."""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dotmesh.errors import DotmeshError, Unauthorized
from dotmesh.server import web
from dotmesh.server.web import session as sessions
from dotmesh.server.web.session import Session

# Sent with every page: no scripts at all, no framing (clickjacking), no referrer to
# other sites (URLs name dots).
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
           "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
FORM_BYTES = 64 << 10
# Sent with every other answer (the API's JSON, the framework's own 404 and 405): nothing a
# browser gets from these servers is sniffed as HTML, framed or run.
BASELINE = {"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
            "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"}


class BaselineHeaders:
    """ASGI middleware adding :data:`BASELINE` to every answer that does not set its own
    (a page's :data:`HEADERS` stay as they are)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in BASELINE.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def ago(ts_ns: int, now: float | None = None) -> Markup:
    """``3 hours ago``, with the exact UTC time on hover."""
    t = ts_ns / 1e9
    secs = (time.time() if now is None else now) - t
    exact = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    iso = datetime.fromtimestamp(t, UTC).isoformat()
    return Markup('<time datetime="{}" title="{}">{}</time>').format(iso, exact, _ago(secs))


def _ago(secs: float) -> str:
    if secs < 0:
        return "in the future"
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = int(secs // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def size(n: int | None) -> str:
    """Bytes as people read them: 512 B, 1.5 KiB, 23 MiB."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError


_env = jinja2.Environment(loader=jinja2.PackageLoader(web.__name__, "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)
_env.globals.update(ago=ago)
_env.filters.update(size=size)


@functools.cache
def stylesheet() -> str:
    return resources.files(web).joinpath("static/style.css").read_text()


@dataclass
class Visit:
    """One request as a page handler sees it."""

    request: Request
    session: Session
    csrf: str
    user: str | None
    form: dict[str, str] = field(default_factory=dict)

    @property
    def query(self) -> Any:
        return self.request.query_params

    @property
    def params(self) -> dict[str, str]:
        return dict(self.request.path_params)

    def signed(self, name: str) -> str | None:
        """The query parameter ``name`` if this site put it there (:meth:`redirect`), with
        its MAC; None otherwise: a link from anyone else cannot put words on our pages."""
        text, mac = self.query.get(name), self.query.get(name + "_mac")
        secret = self.request.state.site.secret
        if text is None or mac is None or not hmac.compare_digest(
                str(mac).encode(), _note_mac(secret, self.session, name, text).encode()):
            return None
        return str(text)

    @property
    def note(self) -> str | None:
        return self.signed("note")

    def page(self, template: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("note", self.note)
        html = _env.get_template(template).render(csrf=self.csrf, user=self.user,
                                                  site=self.request.state.site, **context)
        return HTMLResponse(html, status_code=status)

    def redirect(self, url: str, note: str | None = None, name: str = "note") -> Response:
        """After a POST: back to a page (303, so a reload does not post again), which shows
        ``note`` (signed for this session, so that only this site's redirects show one, and
        only to the browser that was redirected)."""
        if note:
            note = note[:500]
            after = getattr(self.request.state, "new_session", None) or self.session
            mac = _note_mac(self.request.state.site.secret, after, name, note)
            url += (("&" if "?" in url else "?") + f"{name}={_quote(note)}"
                    f"&{name}_mac={_quote(mac)}")
        return RedirectResponse(url, status_code=303)


def _quote(text: str) -> str:
    return quote(text, safe="")


def _note_mac(secret: bytes, s: Session, name: str, text: str) -> str:
    """Bound to the session too: a note's link shows it to the one who did the action."""
    return sessions.mac(secret, f"note:{s.nonce}:{name}:{text}".encode())[:22]


Handler = Callable[[Visit], Response]
Who = Callable[[Session], str | None]  # the session's user, checked (Unauthorized if not)


@dataclass(frozen=True)
class Site:
    """What differs between the hub's pages and dm ui's: the title, whether one signs in,
    the secret that signs cookies, and how a session's user is checked."""

    title: str
    secret: bytes
    who: Who
    sign_in: bool  # a hub: pages need a signed-in user; dm ui: a session from its link
    cookie: str = sessions.COOKIE  # dm ui's has its port in it: cookies ignore ports


def routes(site: Site, table: list[tuple[str, str, Handler]]) -> list[Route]:
    return [Route(path, _endpoint(site, method, fn), methods=[method])
            for path, method, fn in table] + [Route("/static/style.css", _css)]


async def _css(request: Request) -> Response:
    return Response(stylesheet(), media_type="text/css",
                    headers={"Cache-Control": "max-age=3600"})


def _endpoint(site: Site, method: str, fn: Handler) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        request.state.site = site
        raw = request.cookies.get(site.cookie)
        s = sessions.decode(site.secret, raw)
        fresh = s is None
        if s is None:
            s = Session.new()
        form: dict[str, str] = {}
        v = Visit(request, s, sessions.csrf_token(site.secret, s), None)
        try:
            if method == "POST":
                declared = request.headers.get("content-length", "")
                if not declared.isdigit() or int(declared) > FORM_BYTES:  # browsers say
                    return _finish(site, request, v.page("error.html", 413, title="Too large",
                                   message="That form was too large."), s, fresh)
                async with request.form(max_files=0, max_fields=50) as data:
                    form = {k: str(val) for k, val in data.items() if isinstance(val, str)}
                if fresh or not sessions.csrf_ok(site.secret, s, form.get("csrf")):
                    return _finish(site, request, v.page(
                        "error.html", 403, title="Form expired",
                        message="This form's security token is missing or out of date "
                        "(CSRF check): go back, reload the page and send it again."), s, fresh)
            v.form = form
            if s.user is not None:
                try:
                    v.user = await run_in_threadpool(site.who, s)
                except Unauthorized:
                    s, fresh = Session.new(), True  # a revoked key or a disabled account
                    v = Visit(request, s, sessions.csrf_token(site.secret, s), None, form)
            response = await run_in_threadpool(fn, v)
        except Unauthorized as e:
            response = _sign_in_page(site, v, str(e))
        except DotmeshError as e:
            response = v.page("error.html", e.http_status, title=_title(e.http_status),
                              message=str(e))
        return _finish(site, request, response, v.session, fresh)
    return endpoint


def _sign_in_page(site: Site, v: Visit, message: str) -> Response:
    if site.sign_in:
        return v.page("signin.html", 401, message=message,
                      next=v.request.url.path if v.request.method == "GET" else "/")
    return v.page("error.html", 401, title="Open dm ui's link",
                  message="This page needs the link dm ui printed when it started (it "
                  "carries a random token): open that link in this browser.")


def _title(status: int) -> str:
    return {403: "Not allowed", 404: "Not found", 409: "Refused", 423: "Busy",
            400: "Cannot do that"}.get(status, "Something went wrong")


def _finish(site: Site, request: Request, response: Response, s: Session,
            fresh: bool) -> Response:
    response.headers.update(HEADERS)
    replaced = getattr(request.state, "new_session", None)
    if replaced is not None:
        s, fresh = replaced, True
    if fresh:
        response.set_cookie(site.cookie, sessions.encode(site.secret, s),
                            max_age=sessions.MAX_AGE, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", path="/")
    return response


def start_session(v: Visit, user: str | None, key_id: str | None) -> Session:
    """Sign ``user`` in from now on: a new session (and CSRF nonce), set as the request ends."""
    s = Session.new(user, key_id)
    v.request.state.new_session = s
    return s


def short(hex_id: str) -> str:
    return hex_id[:12]


def commit_row(c: dict[str, Any]) -> dict[str, Any]:
    """A commit as pages list it, from its JSON (``hub/browse.commit_json``): the first line
    of its message, who, when, its freeze and its own metadata."""
    meta = dict(c["metadata"])
    freeze = meta.pop("dm.freeze_ms", None)
    writers = meta.pop("dm.writers", None)
    first, _, rest = c["message"].partition("\n")
    return {**c, "short": short(c["id"]), "title": first, "body": rest.strip(),
            "freeze_ms": freeze, "writers": writers, "user_metadata": meta}
