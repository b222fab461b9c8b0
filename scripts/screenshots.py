"""Screenshots of the web UI for the README (run by scripts/screenshots.sh): a hub with
sample data in a temporary folder, its main pages and dm ui's dot page in headless Chromium,
written to docs/screenshots/*.png. Nothing outside the temporary folder is touched."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DM = str(Path(sys.executable).parent / "dm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str) -> None:
    for _ in range(300):
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers at {url}")


def main() -> None:
    top = Path(tempfile.mkdtemp(prefix="dm-screens-"))
    procs: list[subprocess.Popen[str]] = []
    base_env = {**os.environ, "DM_DAEMON": "off"}

    def dm(home: str, *args: str, key: str | None = None) -> str:
        env = {**base_env, "DM_HOME": str(top / home), "DM_AUTHOR": home}
        if key:
            env["DM_API_KEY"] = key
        p = subprocess.run([DM, *args], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if p.returncode:
            raise SystemExit(f"dm {' '.join(args)}: {p.stderr}")
        return p.stdout

    try:
        hub = ["hub", "--data", str(top / "hub")]
        keys = {u: dm("admin", *hub, "user", "add", u, "--json").split('"api_key": "')[1]
                .split('"')[0] for u in ("ann", "ben")}
        port = free_port()
        procs.append(subprocess.Popen([DM, *hub, "serve", "--port", str(port)], env=base_env,
                                      stdin=subprocess.DEVNULL, text=True))
        wait_for(f"http://127.0.0.1:{port}/signin")
        for user in ("ann", "ben"):
            dm(user, "remote", "add", "hub", f"{user}@127.0.0.1:{port}", "--http",
               key=keys[user])
        dm("ann", "init", "shop")
        db = Path(dm("ann", "path", "shop.db").strip())
        uploads = Path(dm("ann", "path", "shop.uploads").strip())
        (db / "users.csv").write_text("id,name\n1,ann\n")
        (uploads / "logo.png").write_bytes(os.urandom(40_000))
        dm("ann", "commit", "-m", "Seed data: one user, the logo", "--no-freeze")
        (db / "users.csv").write_text("id,name\n1,ann\n2,ben\n3,cal\n")
        (db / "orders.csv").write_text("id,user,total\n" + "".join(
            f"{i},{i % 3 + 1},{i * 7 % 100}.00\n" for i in range(400)))
        dm("ann", "commit", "-m", "400 orders for the load test", "-d", "ticket=SHOP-12",
           "--no-freeze")
        dm("ann", "tag", "load-test", "-m", "the state the load test starts from")
        (uploads / "banner.jpg").write_bytes(os.urandom(250_000))
        (db / "users.csv").write_text("id,name\n1,ann\n2,ben\n")
        dm("ann", "commit", "-m", "cal deleted; a banner uploaded", "--no-freeze")
        dm("ann", "push", "hub", "shop")
        dm("ann", "init", "blog")
        dm("ann", "switch", "blog")
        (Path(dm("ann", "path", "blog").strip()) / "posts.json").write_text("[]")
        dm("ann", "commit", "-m", "Empty blog", "--no-freeze")
        dm("ann", "push", "hub", "blog")
        dm("ann", "switch", "shop")
        dm("ben", "init", "analytics")
        (Path(dm("ben", "path", "analytics").strip()) / "events.csv").write_text("a,b\n")
        dm("ben", "commit", "-m", "First events", "--no-freeze")
        dm("ben", "push", "hub", "analytics")
        dm("admin", *hub, "collaborator", "add", "ben/analytics", "ann", "--role", "read")
        dm("admin", *hub, "collaborator", "add", "ann/shop", "ben", "--role", "write")

        opts = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        driver.implicitly_wait(5)
        OUT.mkdir(parents=True, exist_ok=True)

        def shot(name: str, url: str, width: int = 1200, height: int = 0) -> None:
            """The page at ``width`` CSS pixels, whole (up to 1800 high) or ``height`` high."""
            metrics = {"width": width, "height": height or 900, "deviceScaleFactor": 1,
                       "mobile": width < 600}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.get(url)
            if not height:
                full = int(driver.execute_script(
                    "return document.querySelector('footer').getBoundingClientRect().bottom"))
                metrics["height"] = min(max(full + 8, 400), 1800)
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.save_screenshot(str(OUT / f"{name}.png"))
            print(f"wrote docs/screenshots/{name}.png")

        try:
            base = f"http://127.0.0.1:{port}"
            driver.get(base + "/signin")
            driver.find_element(By.ID, "user").send_keys("ann")
            driver.find_element(By.ID, "api_key").send_keys(keys["ann"])
            driver.find_element(By.ID, "signin").click()
            time.sleep(0.5)
            shot("dots", base + "/")
            shot("dot", base + "/dots/ann/shop")
            head = httpx.get(base + "/api/v1/dots/ann/shop", auth=("ann", keys["ann"])).json()
            shot("commit", base + f"/dots/ann/shop/commits/{head['branches']['master']}")
            shot("collaborators", base + "/dots/ann/shop/collaborators")
            shot("keys", base + "/keys")
            shot("dot-phone", base + "/dots/ann/shop", width=390, height=844)
            ui_port = free_port()
            ui = subprocess.Popen([DM, "ui", "--port", str(ui_port)], stdout=subprocess.PIPE,
                                  env={**base_env, "DM_HOME": str(top / "ann")}, text=True,
                                  stdin=subprocess.DEVNULL)
            procs.append(ui)
            assert ui.stdout is not None
            link = ui.stdout.readline().strip()
            wait_for(f"http://127.0.0.1:{ui_port}/")
            driver.get(link)
            shot("ui-dot", f"http://127.0.0.1:{ui_port}/dots/shop")
        finally:
            driver.quit()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
