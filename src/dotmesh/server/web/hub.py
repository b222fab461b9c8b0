"""The hub's pages, mounted at ``/`` by ``dm hub serve`` beside its API (``/api/v1``): sign
in with an API key, the dots you may read, a dot's branches, tags and history, a commit with
the files it changed, collaborators and publicity (its owner), forks, deletes, your API keys.
Every read and change is one :class:`HubStore` call or a view of ``hub/browse.py``, as the
API's are: the pages add no rules of their own."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response
from starlette.routing import Route

from dotmesh.errors import Corrupt, Forbidden, NotFound, Unauthorized, UsageError
from dotmesh.model.ids import ObjectId, parse_hex_id
from dotmesh.model.names import DEFAULT_BRANCH, check_name
from dotmesh.server.hub.browse import LOG_LIMIT, commit, commit_view, log_page, newest
from dotmesh.server.hub.storage import HubStore, key_digest, key_id
from dotmesh.server.web.pages import Site, Visit, commit_row, routes, start_session
from dotmesh.server.web.session import MAX_AGE, Session

DOTS_SHOWN = 500  # dots on the home page


def commit_id(text: str) -> ObjectId:
    try:
        return parse_hex_id(text)
    except Corrupt:
        raise NotFound(f"no commit {text[:80]!r}: a commit is named by its whole id") from None


def safe_next(url: str | None) -> str:
    """Where to go after signing in: a path of this site only."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url


def hub_routes(store: HubStore, secret: bytes) -> list[Route]:
    def who(s: Session) -> str | None:
        if s.user is None or s.key_id is None:
            return None
        store.check_key_id(s.user, s.key_id)
        store.check_web_session(s.nonce, s.user)  # not signed out since
        return s.user

    site = Site("dm hub", secret, who, sign_in=True)

    def signed_in(v: Visit) -> str:
        if v.user is None:
            raise Unauthorized("Sign in with your user name and API key.")
        return v.user

    def listed(user: str | None) -> tuple[list[dict[str, Any]], bool]:
        """The first DOTS_SHOWN dots ``user`` may read (None: the public ones), each with
        its last commit; and whether there are more."""
        found = store.visible(user, None, DOTS_SHOWN)
        rows = store.summaries(found)
        for (dot, _), row in zip(found, rows, strict=True):
            heads = {b: commit_id(h) for b, h in row["branches"].items()}
            row["last"] = newest(store.getter(dot), heads)
        return rows, len(found) == DOTS_SHOWN

    def public(v: Visit) -> Response:
        """The public dots, for anyone (they may be cloned without a key)."""
        rows, truncated = listed(None)
        return v.page("dots.html", groups=[("Public dots", rows)], note=v.note,
                      truncated=truncated, anonymous=v.user is None, public_only=True)

    def home(v: Visit) -> Response:
        user = signed_in(v)
        rows, truncated = listed(user)
        groups = [("Your dots", [r for r in rows if r["access"] == "owner"]),
                  ("Shared with you", [r for r in rows if r["access"] in ("read", "write")
                                       and user in r["collaborators"]]),
                  ("Public", [r for r in rows if r["access"] == "read"
                              and user not in r["collaborators"]])]
        return v.page("dots.html", groups=groups, note=v.note, truncated=truncated,
                      anonymous=False, public_only=False)

    def sign_in_form(v: Visit) -> Response:
        return v.page("signin.html", message=None, next=safe_next(v.query.get("next")))

    def sign_in(v: Visit) -> Response:
        name, key = v.form.get("user", "").strip(), v.form.get("api_key", "").strip()
        try:
            check_name(name, "user name")
            store.authenticate(name, key)
        except (Unauthorized, UsageError):
            return v.page("signin.html", 401, next=safe_next(v.form.get("next")),
                          message="That user name and API key do not match an account "
                          "of this hub (dm hub user key NAME makes a key).")
        if v.session.user is not None:  # signing in over a session: that one ends
            store.web_session_end(v.session.nonce)
        new = start_session(v, name, key_id(key_digest(key)))
        store.web_session_start(new.nonce, name, MAX_AGE)
        return v.redirect(safe_next(v.form.get("next")))

    def sign_out(v: Visit) -> Response:
        store.web_session_end(v.session.nonce)  # a copy of the cookie is refused too
        start_session(v, None, None)
        return v.redirect("/signin", "Signed out.")

    def keys(v: Visit, created: Any = None) -> Response:
        user = signed_in(v)
        listed = [{"id": kid, "created_ns": ns, "current": kid == v.session.key_id}
                  for kid, ns in store.list_keys(user)]
        return v.page("keys.html", keys=listed, created=created, note=v.note)

    def key_new(v: Visit) -> Response:
        return keys(v, store.new_key(signed_in(v)))

    def key_revoke(v: Visit) -> Response:
        user = signed_in(v)
        kid = v.params["id"]
        store.revoke_key(kid, user)
        if kid == v.session.key_id:
            store.web_session_end(v.session.nonce)
            start_session(v, None, None)
            return v.redirect("/signin", f"Key {kid} revoked: it signed you in, so sign in "
                              "with another one.")
        return v.redirect("/keys", f"Key {kid} revoked: requests with it are refused now.")

    def dot_page(v: Visit) -> Response:
        ns, name = v.params["ns"], v.params["dot"]
        dot = store.dot_for(v.user, ns, name)
        desc = store.describe(dot)
        branches = desc["branches"]
        ref = v.query.get("ref") or (DEFAULT_BRANCH if DEFAULT_BRANCH in branches or not branches
                                     else sorted(branches)[0])
        get = store.getter(dot)
        if v.query.get("after"):
            parents = commit(get, commit_id(v.query["after"])).parents
            start = parents[0] if parents else None
        elif branches:
            start = store.resolve(dot, ref)
        else:
            start = None
        commits, following = log_page(get, start, LOG_LIMIT)
        tags = sorted(({"name": n, **t} for n, t in desc["tags"].items()),
                      key=lambda t: -int(t["ts_ns"]))
        role = store.access(v.user, ns, dot)
        return v.page("dot.html", local=False, dot=str(dot), base=f"/dots/{dot}",
                      desc=desc, role=role, ref=ref,
                      branches=[{"name": b, "head": h, "current": b == ref}
                                for b, h in sorted(branches.items())],
                      tags=tags, commits=[commit_row(c) for c in commits], next=following,
                      note=v.note,
                      empty_hint=f"dm push hub {name}" if role == "owner" else None)

    def commit_page(v: Visit) -> Response:
        ns, name = v.params["ns"], v.params["dot"]
        dot = store.dot_for(v.user, ns, name)
        view = commit_view(store.getter(dot), commit_id(v.params["commit"]))
        changes = view["diff"]["changes"]
        sizes: dict[str, dict[str, int]] = {}
        for sub in view["subdots"]:
            sizes[sub] = {"files": 0, "added": 0, "removed": 0}
        for ch in changes:
            s = sizes.setdefault(ch["subdot"], {"files": 0, "added": 0, "removed": 0})
            s["files"] += 1
            s["added"] += ch["new_size"] if ch["status"] != "removed" else 0
            s["removed"] += ch["old_size"] if ch["status"] != "added" else 0
        return v.page("commit.html", local=False, dot=str(dot), base=f"/dots/{dot}",
                      c=commit_row(view), changes=changes, truncated=view["diff"]["truncated"],
                      sizes=sizes, totals=None, reports=None, data_url=None,
                      changes_note=None, data_hint=(
                          "Row and key summaries of database subdots are computed by the "
                          "store that holds the data: dm clone it, then dm ui."))

    def owner(v: Visit) -> tuple[str, str]:
        user = signed_in(v)
        ns, name = v.params["ns"], v.params["dot"]
        store.dot_for(user, ns, name)  # Forbidden to a stranger, as the API
        if user != ns:
            raise Forbidden(f"only {ns} may see and change who may use {ns}/{name}")
        return ns, name

    def collaborators(v: Visit) -> Response:
        ns, name = owner(v)
        dot = store.dot_for(v.user, ns, name)
        roles = store.roles_of([dot.id]).get(dot.id, {})
        return v.page("collaborators.html", dot=str(dot), base=f"/dots/{dot}",
                      roles=sorted(roles.items()), public=store.describe(dot)["public"],
                      note=v.note)

    def collaborator_add(v: Visit) -> Response:
        ns, name = owner(v)
        who, role = v.form.get("user", "").strip(), v.form.get("role", "read")
        if role not in ("read", "write"):
            raise UsageError("a collaborator's role is read or write")
        store.add_collaborator(ns, name, check_name(who, "user name"), role)
        return v.redirect(f"/dots/{ns}/{name}/collaborators",
                          f"{who} may now {'read' if role == 'read' else 'read and push to'} "
                          f"{ns}/{name}.")

    def collaborator_rm(v: Visit) -> Response:
        ns, name = owner(v)
        who = v.params["user"]
        store.remove_collaborator(ns, name, who)
        return v.redirect(f"/dots/{ns}/{name}/collaborators", f"{who} removed.")

    def publicity(v: Visit) -> Response:
        ns, name = owner(v)
        public = v.form.get("public") == "yes"
        store.set_public(ns, name, public)
        return v.redirect(f"/dots/{ns}/{name}/collaborators",
                          f"{ns}/{name} is {'now public' if public else 'private again'}.")

    def fork(v: Visit) -> Response:
        user = signed_in(v)
        source = store.dot_for(user, v.params["ns"], v.params["dot"])
        name = v.form.get("name", "").strip() or source.name
        new = store.fork(user, source, check_name(name, "dot name"))
        return v.redirect(f"/dots/{new}", f"Forked from {source}.")

    def delete(v: Visit) -> Response:
        ns, name = owner(v)
        if v.form.get("confirm", "").strip() != name:
            raise UsageError(f"type the dot's name ({name}) to delete it")
        store.remove_dot(ns, name)
        return v.redirect("/", f"Deleted {ns}/{name}.")

    d = "/dots/{ns}/{dot}"
    return routes(site, [
        ("/", "GET", home),
        ("/public", "GET", public),
        ("/signin", "GET", sign_in_form),
        ("/signin", "POST", sign_in),
        ("/signout", "POST", sign_out),
        ("/keys", "GET", keys),
        ("/keys", "POST", key_new),
        ("/keys/{id}/revoke", "POST", key_revoke),
        (d, "GET", dot_page),
        (d + "/commits/{commit}", "GET", commit_page),
        (d + "/collaborators", "GET", collaborators),
        (d + "/collaborators", "POST", collaborator_add),
        (d + "/collaborators/{user}/remove", "POST", collaborator_rm),
        (d + "/public", "POST", publicity),
        (d + "/fork", "POST", fork),
        (d + "/delete", "POST", delete),
    ])
