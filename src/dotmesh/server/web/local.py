"""``dm ui``: the hub's pages over the local store, on 127.0.0.1, with the actions a developer
wants from a page (check out a branch, reset to a commit, tag, commit now). Every read and
action is one call of the Python API (``dotmesh.api``), on a store opened for the request, so
a page does what the same ``dm`` command does, refusals included (a reset while writers run).

Anyone on the machine can reach 127.0.0.1, so the pages need the session that the link
``dm ui`` prints (with a random token) starts; forms carry the CSRF token as on a hub."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response
from starlette.routing import Route

from dotmesh.api import Dot, Repo
from dotmesh.errors import DotmeshError, NotFound, Unauthorized, UsageError
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import check_name
from dotmesh.server.hub.browse import LOG_LIMIT, commit_json
from dotmesh.server.web.pages import BaselineHeaders, Site, Visit, commit_row, routes, start_session
from dotmesh.server.web.session import Session

LOCAL_USER = "local"  # the session a dm ui link starts


def local_routes(home: Path, secret: bytes, token: str, port: int | None = None
                 ) -> list[Route]:
    def who(s: Session) -> str | None:
        return LOCAL_USER if s.user == LOCAL_USER else None

    # A browser sends a cookie of 127.0.0.1 to every port of it: a name of dm ui's own (with
    # its port) keeps a hub or another dm ui on this machine from replacing this session.
    site = Site("dm ui", secret, who, sign_in=False,
                cookie=f"dm_ui_{port}" if port else "dm_ui")

    def opened(v: Visit) -> None:
        if v.user is None:
            raise Unauthorized("open the link dm ui printed")

    def open_link(v: Visit) -> Response:
        given = v.query.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("that link's token is not this dm ui's")
        start_session(v, LOCAL_USER, None)
        return v.redirect("/")

    def home_page(v: Visit) -> Response:
        opened(v)
        rows = []
        with Repo.open(home) as repo:
            for dot in repo.dots():
                head = dot.head
                last = commit_json(head, dot.log(head, limit=1)[0].commit) if head else None
                rows.append({"name": dot.name, "branch": dot.branch, "last": last,
                             "subdots": dot.subdots(), "branches": len(dot.branches())})
        return v.page("local_dots.html", rows=rows, home=str(home))

    def dot_page(v: Visit) -> Response:
        opened(v)
        name = check_name(v.params["dot"], "dot name")
        with Repo.open(home) as repo:
            dot = repo.dot(name)
            current = dot.branch
            branches = dot.branches()
            ref = v.query.get("ref") or current
            if ref not in branches:
                dot.resolve(ref)  # NotFound names what it lacks
            after = v.query.get("after")
            if after:
                dot.resolve(after)  # NotFound for a mistyped link, not an empty history
            start = f"{after}~1" if after else ref
            try:
                log = dot.log(start, limit=LOG_LIMIT + 1) if branches.get(ref, 1) else []
            except NotFound:
                log = []
            commits = [commit_row(commit_json(e.id, e.commit)) for e in log[:LOG_LIMIT]]
            tags = [{"name": n, "commit": t.commit.hex(), "message": t.message}
                    for n, t in sorted(dot.tags().items(), key=lambda nt: -nt[1].ts_ns)]
        return v.page("dot.html", local=True, dot=name, base=f"/dots/{name}", desc={},
                      role="owner", ref=ref, current=current, tags=tags, commits=commits,
                      next=commits[-1]["id"] if len(log) > LOG_LIMIT else None,
                      branches=[{"name": b, "head": h.hex() if h else None,
                                 "current": b == ref, "checked_out": b == current}
                                for b, h in sorted(branches.items())],
                      empty_hint=None, error=v.signed("error"))

    def commit_page(v: Visit) -> Response:
        opened(v)
        name = check_name(v.params["dot"], "dot name")
        with Repo.open(home) as repo:
            dot = repo.dot(name)
            oid = dot.resolve(v.params["commit"])
            shown = dot.show(oid)
            parent: ObjectId | None = shown.commit.parents[0] if shown.commit.parents else None
            changes = [vars(ch) for ch in dot.diff(parent, oid)] if parent else []
            # Only on a POST (CSRF-checked): a link from another site could start the
            # throwaway database servers, and freeze a running app for a working state.
            reports = dot.diff_data(parent, oid) if parent and v.form.get("data") else None
        c = commit_row(commit_json(oid, shown.commit))
        base = f"/dots/{name}"
        return v.page("commit.html", local=True, dot=name, base=base, c=c, changes=changes,
                      truncated=False, reports=reports,
                      sizes={s: {"files": z.files, "bytes": z.bytes}
                             for s, z in sorted(shown.sizes.items())},
                      totals={"added": shown.added, "removed": shown.removed,
                              "changed": shown.changed, "bytes_added": shown.bytes_added,
                              "bytes_removed": shown.bytes_removed},
                      changes_note=None if parent else
                      f"The first commit: {shown.added} files, listed by dm ls {name}.",
                      data_url=f"{base}/commits/{c['id']}" if parent else None,
                      data_hint="A first commit has nothing to compare its data with.")

    def action(v: Visit, run: Callable[[Dot], str]) -> Response:
        """Do ``run(dot)``; back to the dot's page with what happened, or why not."""
        opened(v)
        name = check_name(v.params["dot"], "dot name")
        try:
            with Repo.open(home) as repo:
                note = run(repo.dot(name))
        except DotmeshError as e:
            why = str(e)
            if "--stop-writers" in why:  # the CLI's way out; a page has no such flag
                why += " (this page never stops them: stop them, or run that dm command " \
                       "in a terminal)"
            return v.redirect(f"/dots/{name}", why, name="error")
        return v.redirect(f"/dots/{name}", note)

    def checkout(v: Visit) -> Response:
        branch = v.form.get("branch", "").strip()
        create = v.form.get("create") == "yes"

        def run(dot: Dot) -> str:
            dot.checkout(branch, create=create)
            return f"{'Created and checked out' if create else 'Checked out'} {branch}."
        return action(v, run)

    def reset(v: Visit) -> Response:
        ref = v.form.get("ref", "").strip()

        def run(dot: Dot) -> str:
            r = dot.reset(ref)
            saved = (f" The state it replaced is saved as {r.saved.hex()[:12]} (dm reflog)."
                     if r.saved else "")
            return f"{dot.branch} is now at {r.new.hex()[:12]}.{saved}"
        return action(v, run)

    def tag(v: Visit) -> Response:
        name = v.form.get("name", "").strip()
        ref = v.form.get("ref", "").strip() or "HEAD"
        message = v.form.get("message", "")

        def run(dot: Dot) -> str:
            t = dot.tag(name, ref, message)
            return f"Tagged {t.commit.hex()[:12]} {name}."
        return action(v, run)

    def commit_now(v: Visit) -> Response:
        message = v.form.get("message", "").strip()

        def run(dot: Dot) -> str:
            if not message:
                raise UsageError("a commit needs a message")
            r = dot.commit(message)
            return f"Committed {r.id.hex()[:12]} on {dot.branch}."
        return action(v, run)

    d = "/dots/{dot}"
    return routes(site, [
        ("/", "GET", home_page),
        ("/open", "GET", open_link),
        (d, "GET", dot_page),
        (d + "/commits/{commit}", "GET", commit_page),
        (d + "/commits/{commit}", "POST", commit_page),  # with the data diff
        (d + "/checkout", "POST", checkout),
        (d + "/reset", "POST", reset),
        (d + "/tag", "POST", tag),
        (d + "/commit", "POST", commit_now),
    ])


def create_app(home: Path, token: str, secret: bytes | None = None,
               port: int | None = None) -> Starlette:
    """The ``dm ui`` app over the store at ``home``; its pages need the session that
    ``/open?token=TOKEN`` starts. Only 127.0.0.1 and localhost are answered (a page of
    another site cannot reach it by a DNS name of its own)."""
    return Starlette(routes=local_routes(home, secret or secrets.token_bytes(32), token, port),
                     middleware=[Middleware(BaselineHeaders),
                                 Middleware(TrustedHostMiddleware,
                                            allowed_hosts=["127.0.0.1", "localhost"])])
