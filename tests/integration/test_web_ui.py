"""The web UI in a real browser (headless Chromium through selenium) against a real
``dm hub serve`` and a real ``dm ui``: sign in, list dots, open a commit, add a read
collaborator who sees the dot but cannot push, revoke a key and see the next request refused,
fork, delete; and dm ui's actions, a reset refused while a writer runs, a phone-sized window.
One hub, one browser for the module; the tests run in order, each going on from the last."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dotmesh.server.hub.config import HubConfig
from tests.conftest import DM, DM_BIN
from tests.integration.remote_env import Hub, free_port

pytestmark = pytest.mark.slow  # a browser, a hub and dm ui

USERS = ("ann", "ben", "eve")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    assert shutil.which("chromium") and shutil.which("chromedriver"), \
        "needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)"

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # the driver's path given: selenium-manager never runs (it would download one)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, Path]]:
    """A hub with ann, ben and eve; ann's dot app (two commits) pushed to it."""
    top = tmp_path_factory.mktemp("webui")
    h = Hub(["--data", str(top / "data")], top)
    store = HubConfig({"data": str(top / "data")}).store()
    h.keys = {u: store.add_user(u).key for u in USERS}
    store.close()
    h.start()
    try:
        ann = dev(top, "ann", h)
        ann.ok("init", "app")
        folder = ann.path("app")
        (folder / "users.csv").write_text("id,name\n1,ann\n")
        ann.ok("commit", "-m", "first users", "--no-freeze")
        (folder / "users.csv").write_text("id,name\n1,ann\n2,<b>bob</b>\n")
        (folder / "notes.txt").write_text("hello")
        ann.ok("commit", "-m", "bob <script>alert(1)</script> joins", "--no-freeze")
        ann.ok("push", "hub", "app")
        yield h, top
    finally:
        h.stop()


def dev(top: Path, name: str, hub: Hub) -> DM:
    dm = DM(top / name)
    hub.join(dm, name, hub.keys[name])
    return dm


def url(hub: Hub, path: str = "/") -> str:
    return f"http://127.0.0.1:{hub.ports[0]}{path}"


def find(driver, css: str):
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    return driver.find_element(By.CSS_SELECTOR, css)


def text(driver) -> str:
    return str(find(driver, "body").text)


def sign_in(driver, hub: Hub, user: str, key: str | None = None) -> None:
    driver.delete_all_cookies()
    driver.get(url(hub, "/signin"))
    find(driver, "#user").send_keys(user)
    find(driver, "#api_key").send_keys(key or hub.keys[user])
    submit(driver, find(driver, "#signin"))
    assert f"Sign out {user}" in text(driver)


def submit(driver, element) -> None:
    """Click a form's button (or a link) and wait until the next page has replaced this."""
    from selenium.common.exceptions import WebDriverException  # noqa: PLC0415
    from selenium.webdriver.support import expected_conditions  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    old = find(driver, "html")
    element.click()

    def replaced(d: object) -> bool:
        try:
            return bool(expected_conditions.staleness_of(old)(d))
        except WebDriverException as e:  # chromedriver's way of saying so mid-navigation
            if "does not belong to the document" in str(e):
                return True
            raise

    WebDriverWait(driver, 30).until(replaced)


def click_button(driver, label: str) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    submit(driver, driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']"))


def test_sign_in_list_dots_and_open_a_commit(browser, world) -> None:
    hub, _ = world
    browser.get(url(hub))
    assert "Sign in" in browser.title and "ann/app" not in browser.page_source
    sign_in(browser, hub, "ann")
    page = text(browser)
    assert "Your dots" in page and "ann/app" in page and "just now" in page
    submit(browser, find(browser, "a.dot"))
    page = text(browser)
    assert "first users" in page and "bob <script>alert(1)</script> joins" in page
    assert "master" in page and "ann" in page
    assert find(browser, "time").get_attribute("title").endswith("UTC")
    submit(browser, find(browser, "ol.log a.title"))  # the newest commit
    page = text(browser)
    assert "users.csv" in page and "notes.txt" in page and "Files changed" in page
    assert re.search(r"\d+ B → \d+ B", page)


def test_a_read_collaborator_sees_the_dot_but_cannot_push(browser, world) -> None:
    hub, top = world
    browser.get(url(hub, "/dots/ann/app/collaborators"))
    assert "Only you can see this dot" in text(browser)
    find(browser, "#collaborator").send_keys("ben")
    submit(browser, find(browser, "#add-collaborator"))  # role: read, the first choice
    assert "ben may now read ann/app" in text(browser)
    sign_in(browser, hub, "ben")
    assert "Shared with you" in text(browser) and "ann/app" in text(browser)
    browser.get(url(hub, "/dots/ann/app"))
    assert "first users" in text(browser) and "Collaborators" not in text(browser)
    browser.get(url(hub, "/dots/ann/app/collaborators"))
    assert "Not allowed" in text(browser)
    ben = dev(top, "ben", hub)
    ben.ok("clone", "hub", "ann/app")
    (ben.path("app") / "notes.txt").write_text("ben was here")
    ben.ok("commit", "-m", "ben's change", "--no-freeze")
    refused = ben("push", "hub", "app")
    assert refused.returncode != 0 and "may read ann/app but not push" in refused.stderr
    sign_in(browser, hub, "eve")
    assert "ann/app" not in text(browser) and "No dots yet" in text(browser)
    browser.get(url(hub, "/dots/ann/app"))
    assert "Not allowed" in text(browser) and "first users" not in text(browser)


def test_revoke_a_key_and_the_next_request_is_refused(browser, world) -> None:
    hub, _ = world
    sign_in(browser, hub, "ben")
    browser.get(url(hub, "/keys"))
    submit(browser, find(browser, "#new-key-button"))
    new_key = find(browser, "#new-key").text
    api = f"{url(hub)}api/v1/user"
    assert httpx.get(api, auth=("ben", new_key)).status_code == 200
    kid = [r.get_attribute("id")[4:] for r in browser.find_elements("css selector", "tr")
           if r.get_attribute("id") and "this session" not in r.text][-1]
    submit(browser, find(browser, f"#key-{kid} button"))
    assert f"Key {kid} revoked" in text(browser)
    assert httpx.get(api, auth=("ben", new_key)).status_code == 401
    # the key the session signed in with: revoking it signs out
    browser.get(url(hub, "/keys"))
    current = [r.get_attribute("id")[4:] for r in browser.find_elements("css selector", "tr")
               if "this session" in r.text][0]
    submit(browser, find(browser, f"#key-{current} button"))
    assert "Sign in" in browser.title and "sign in with another one" in text(browser)
    assert httpx.get(api, auth=("ben", hub.keys["ben"])).status_code == 401
    browser.get(url(hub, "/dots/ann/app"))
    assert "first users" not in text(browser) and "Sign in" in browser.title


def test_fork_and_delete(browser, world) -> None:
    hub, _ = world
    sign_in(browser, hub, "eve")
    browser.get(url(hub, "/dots/ann/app"))
    assert "Not allowed" in text(browser)
    sign_in(browser, hub, "ann")
    browser.get(url(hub, "/dots/ann/app"))
    find(browser, "input[name=name]").send_keys("app-copy")
    submit(browser, find(browser, "#fork"))
    assert "Forked from ann/app" in text(browser) and "ann/app-copy" in text(browser)
    assert "first users" in text(browser)
    find(browser, "input[name=confirm]").send_keys("app-copy")
    submit(browser, find(browser, "#delete"))
    assert "Deleted ann/app-copy" in text(browser)
    assert "ann/app-copy" not in find(browser, "table").text
    gone = httpx.get(url(hub, "/api/v1/dots/ann/app-copy"), auth=("ann", hub.keys["ann"]))
    assert gone.status_code == 404


def test_a_public_dot_is_browsed_without_signing_in(browser, world) -> None:
    hub, _ = world
    sign_in(browser, hub, "ann")
    browser.get(url(hub, "/dots/ann/app/collaborators"))
    click_button(browser, "Make it public")
    assert "ann/app is now public" in text(browser)
    browser.delete_all_cookies()  # anyone, without a key
    browser.get(url(hub, "/signin"))
    submit(browser, find(browser, "main a[href='/public']"))
    assert "Public dots" in browser.title and "ann/app" in text(browser)
    submit(browser, find(browser, "a.dot"))
    assert "first users" in text(browser)
    sign_in(browser, hub, "ann")
    browser.get(url(hub, "/dots/ann/app/collaborators"))
    click_button(browser, "Make it private")
    browser.delete_all_cookies()
    browser.get(url(hub, "/public"))
    assert "No public dots on this hub yet" in text(browser)


def test_pages_fit_a_phone(browser, world) -> None:
    hub, _ = world
    browser.set_window_size(390, 844)
    try:
        for path in ("/", "/dots/ann/app", "/keys", "/public"):
            browser.get(url(hub, path))
            width = browser.execute_script("return document.documentElement.scrollWidth")
            inner = browser.execute_script("return window.innerWidth")
            assert width <= inner, path
    finally:
        browser.set_window_size(1280, 900)


@pytest.fixture(scope="module")
def ui(world) -> Iterator[tuple[str, DM]]:
    """``dm ui`` over ann's store."""
    hub, top = world
    ann = DM(top / "ann")
    port = free_port()
    proc = subprocess.Popen([DM_BIN, "ui", "--port", str(port)], env=ann.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        link = proc.stdout.readline().strip()
        assert link.startswith(f"http://127.0.0.1:{port}/open?token=")
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.1)
        yield link, ann
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_dm_ui_shows_the_local_store_and_acts_on_it(browser, ui) -> None:
    link, ann = ui
    base = link.split("/open")[0]
    browser.delete_all_cookies()
    browser.get(base + "/dots/app")
    assert "Open dm ui's link" in text(browser)
    browser.get(link)
    assert "app" in text(browser) and "master" in text(browser)
    submit(browser, find(browser, "a.dot"))
    (ann.path("app") / "notes.txt").write_text("changed from a page")
    find(browser, "#commit-message").send_keys("saved from the web UI")
    submit(browser, find(browser, "#commit"))
    assert "Committed" in text(browser) and "saved from the web UI" in text(browser)
    find(browser, "input[name=name][aria-label='Tag name']").send_keys("good")
    click_button(browser, "Tag")
    assert "Tagged" in text(browser) and "good" in text(browser)
    # the commit page: sizes per subdot and the files changed
    submit(browser, find(browser, "ol.log a.title"))
    assert "notes.txt" in text(browser) and "Subdots" in text(browser)
    browser.get(base + "/dots/app")  # not back(): its page may still be loading when clicked
    # a reset while a process uses the dot is refused, as dm reset is
    user = subprocess.Popen(["sleep", "300"], cwd=ann.path("app"))
    try:
        submit(browser, find(browser, "ol.log li:nth-child(2) button"))
        assert "sleep" in find(browser, "#error").text
        assert "--stop-writers" in find(browser, "#error").text
    finally:
        user.kill()
        user.wait()
    submit(browser, find(browser, "ol.log li:nth-child(2) button"))
    assert "is now at" in text(browser)
    assert (ann.path("app") / "notes.txt").read_text() == "hello"
    find(browser, "input[name=branch][aria-label='New branch name']").send_keys("try")
    click_button(browser, "New branch here")
    assert "Created and checked out try" in text(browser)
    assert "try" in ann.ok("branch")
