"""A disposable Docker engine and ``dm serve`` for the volume driver's tests.

The engine has its own data root, exec root and API socket, no bridge and no iptables; every
container runs with no network. There is no registry, so the one image is imported from a
busybox-static root filesystem. ``dm serve`` starts before the engine and stops after it (an
engine that lost its plugin waits 15 s on every call: see shared/notes).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import DM, DM_BIN

DOCKER = "/usr/bin/docker"  # Debian's client, the engine's own version
COMPOSE = "/usr/bin/docker-compose"
IMAGE = "dm-test-bb:local"
PLUGIN_SOCKET = Path("/run/docker/plugins/dm.sock")


def require_docker() -> None:
    missing = [p for p in (DOCKER, COMPOSE, "/usr/sbin/dockerd", "/bin/busybox")
               if not os.path.exists(p)]
    if missing or os.geteuid() != 0:
        raise AssertionError(f"needs root and docker.io, docker-compose, busybox-static "
                             f"(scripts/setup.sh installs them); missing: {missing}")


class Engine:
    """A dockerd of our own; ``run`` drives the docker CLI against it."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.sock = top / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.env = {**os.environ, "DOCKER_HOST": self.host}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.top / "daemon.json").write_text("{}")
        log = open(self.top / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", str(self.top / "daemon.json"), "-H", self.host,
             "--data-root", str(self.top / "root"), "--exec-root", str(self.top / "exec"),
             "--pidfile", str(self.top / "docker.pid"), "--bridge=none", "--iptables=false",
             "--ip-masq=false"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while subprocess.run([DOCKER, "-H", self.host, "version"], capture_output=True,
                             stdin=subprocess.DEVNULL).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("dockerd did not start:\n"
                                     + (self.top / "dockerd.log").read_text()[-3000:])
            time.sleep(0.1)
        self._import_image()

    def _import_image(self) -> None:
        rootfs = self.top / "rootfs"
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "data"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
        applets = subprocess.run([str(rootfs / "bin" / "busybox"), "--list"], check=True,
                                 capture_output=True, text=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", rootfs / "bin" / a)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([DOCKER, "-H", self.host, "import", "-c", 'CMD ["/bin/sh"]', "-",
                        IMAGE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([DOCKER, "-H", self.host, *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {p.stderr}")
        return p

    def compose(self, project_dir: Path, *args: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([COMPOSE, "-p", "mobycounter", *args], cwd=project_dir,
                           env=self.env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=180)
        if check and p.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}: {p.stderr}")
        return p

    def stop(self) -> None:
        if self.proc is None:
            return
        ids = self.run("ps", "-aq", check=False).stdout.split()
        if ids:
            self.run("rm", "-f", *ids, check=False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Plugin:
    """``dm serve`` on the plugin socket dockerd looks at, as a child of the tests."""

    def __init__(self, dm: DM, log: Path) -> None:
        self.dm, self.log = dm, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([DM_BIN, "serve", "--socket", str(PLUGIN_SOCKET)],
                                     env=self.dm.env, stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL)
        out.close()
        deadline = time.monotonic() + 30
        while not _answers(PLUGIN_SOCKET):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("dm serve did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
            self.proc = None


def _answers(sock: Path) -> bool:
    p = subprocess.run(["curl", "-sf", "--unix-socket", str(sock), "-X", "POST",
                        "http://dm/Plugin.Activate"], capture_output=True,
                       stdin=subprocess.DEVNULL)
    return p.returncode == 0


@contextmanager
def docker_world(home: Path | None = None) -> Iterator[tuple[DM, Engine, Plugin]]:
    """dm serve (on the store at ``home``, default a fresh one), then a fresh engine; torn
    down in the opposite order."""
    require_docker()
    with _plugin_socket_held(), _world(home) as world:
        yield world


@contextmanager
def _plugin_socket_held() -> Iterator[None]:
    """The plugin socket's path is fixed (dockerd finds plugins there), so test processes
    (scripts/test.sh runs two) take turns with it: the lock goes with the descriptor."""
    PLUGIN_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    with open(PLUGIN_SOCKET.parent / "dm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def _world(home: Path | None) -> Iterator[tuple[DM, Engine, Plugin]]:
    top = Path(tempfile.mkdtemp(prefix="dm-docker-", dir="/var/tmp"))
    dm = DM(home or top / "home")
    engine = Engine(top / "engine")
    engine.top.mkdir()
    engine_env = {"DOCKER_HOST": engine.host}
    dm.env.update(engine_env)
    plugin = Plugin(dm, top / "plugin.log")
    try:
        plugin.start()
        engine.start()
        yield dm, engine, plugin
    except BaseException:
        for f in (top / "plugin.log", engine.top / "dockerd.log"):
            if f.exists():
                print(f"--- {f}\n{f.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        engine.stop()
        plugin.stop()
        subprocess.run(["umount", "-R", str(engine.top)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)
