"""The dm volume driver under a real dockerd and docker-compose: the seed's compose file works
unchanged, and dm's commands act on the running containers."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import DM, kill_inside
from tests.integration.docker_env import IMAGE, docker_world
from tests.integration.remote_env import Hub

pytestmark = pytest.mark.slow  # a dockerd of its own

# The seed's excerpt, with three services writing to its three volumes.
SERVICE = """
  {name}:
    image: {image}
    network_mode: none
    command: ["sh", "-c", "trap 'exit 0' TERM; echo started >> /data/log;
              while true; do sleep 0.1; done"]
    volumes:
      - {volume}:/data
"""
COMPOSE = 'version: "3.8"\nservices:' + "".join(
    SERVICE.format(name=n, image=IMAGE, volume=v)
    for n, v in (("web", "app.clicks-db"), ("users", "app.users-db"), ("images", "app.uploads"))
) + """
volumes:
  app.clicks-db:
    driver: dm
  app.users-db:
    driver: dm
  app.uploads:
    driver: dm
"""
SERVICES = ("web", "users", "images")


@pytest.fixture(scope="module")
def world():
    with docker_world() as w:
        yield w


def _logs(engine, project: Path) -> dict[str, str]:
    """What each running service sees in its volume (through docker itself: a
    docker-compose exec costs about a second)."""
    return {s: engine.run("exec", f"mobycounter_{s}_1", "cat", "/data/log").stdout
            for s in SERVICES}


def _wait_started(engine, project: Path, times: int) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while True:
        logs = _logs(engine, project)
        if all(log.count("started") >= times for log in logs.values()):
            return logs
        assert time.monotonic() < deadline, logs
        time.sleep(0.1)


def _running(engine, project: Path) -> set[str]:
    """The project's services whose containers run (not paused, not stopped)."""
    out = engine.run("ps", "--filter", "label=com.docker.compose.project=mobycounter",
                     "--filter", "status=running", "--format",
                     '{{.Label "com.docker.compose.service"}}').stdout
    return set(out.split())


def test_the_seeds_compose_file_works_unchanged(world, tmp_path):
    dm, engine, _ = world
    project = tmp_path / "moby-counter"
    project.mkdir()
    (project / "docker-compose.yml").write_text(COMPOSE)
    engine.compose(project, "up", "-d")
    _wait_started(engine, project, 1)

    dots = {d["name"]: d for d in json.loads(dm.ok("list", "--json"))}
    dot = dots["mobycounter_app"]
    assert set(dot["subdots"]) == {"clicks-db", "users-db", "uploads"}
    assert {c["name"] for c in dot["containers"]} == {f"mobycounter_{s}_1" for s in SERVICES}
    assert "mobycounter_web_1" in dm.ok("list")

    dm.ok("switch", "mobycounter_app")
    out = json.loads(dm.ok("commit", "-m", "three services up", "--json"))
    assert out["freeze_ms"] is not None  # the running containers were paused for it
    log = json.loads(dm.ok("log", "--json"))[0]
    assert "container mobycounter_web_1" in log["metadata"]["dm.writers"]
    assert _running(engine, project) == set(SERVICES)  # and unpaused

    for s in SERVICES:
        engine.run("exec", f"mobycounter_{s}_1", "sh", "-c", "echo changed >> /data/log")
    reset = json.loads(dm.ok("reset", "--hard", "HEAD", "--json"))
    assert sorted(reset["restarted"]) == sorted(f"mobycounter_{s}_1" for s in SERVICES)
    assert _running(engine, project) == set(SERVICES)
    logs = _wait_started(engine, project, 2)  # the committed data, seen by new processes
    assert all(log == "started\nstarted\n" for log in logs.values()), logs

    engine.run("exec", "mobycounter_web_1", "sh", "-c", "echo master-only >> /data/log")
    assert "Switched to a new branch experiment" in dm.ok("checkout", "-b", "experiment")
    logs = _wait_started(engine, project, 2)  # the branch starts from the last commit
    assert "master-only" not in logs["web"], logs
    engine.run("exec", "mobycounter_web_1", "sh", "-c", "echo experiment >> /data/log")
    dm.ok("commit", "-m", "on the experiment")
    dm.ok("checkout", "master")
    logs = _wait_started(engine, project, 3)  # master's working state, kept aside
    assert "master-only" in logs["web"] and "experiment" not in logs["web"], logs
    dm.ok("checkout", "experiment")
    assert "experiment" in _wait_started(engine, project, 3)["web"]

    engine.compose(project, "down", "-v", "-t", "5")
    assert engine.run("volume", "ls", "-q").stdout.split() == []
    after = {d["name"]: d for d in json.loads(dm.ok("list", "--json"))}["mobycounter_app"]
    assert after["subdots"] == {} and after["containers"] == []
    history = [c["message"] for c in json.loads(dm.ok("log", "--json"))]
    assert history == ["on the experiment", "three services up"]  # history stays
    dm.ok("checkout", "master")
    dm.ok("reset", "--hard", "HEAD")  # and brings the data back
    assert set(json.loads(dm.ok("dot", "show", "--json"))["subdots"]) == {
        "clicks-db", "users-db", "uploads"}


def test_a_restart_of_dm_serve_loses_no_mount(world):
    dm, engine, plugin = world
    engine.run("volume", "create", "-d", "dm", "restart.data")
    engine.run("run", "-d", "--name", "r1", "--network", "none", "-v", "restart.data:/vol",
               IMAGE, "sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done")
    status = json.loads(engine.run("volume", "inspect", "restart.data").stdout)[0]["Status"]
    assert status["mounts"] == 1 and status["dot"] == "restart"
    plugin.stop(signal.SIGKILL)  # leaves a stale socket behind
    plugin.start()
    status = json.loads(engine.run("volume", "inspect", "restart.data").stdout)[0]["Status"]
    assert status["mounts"] == 1
    engine.run("stop", "-t", "5", "r1")  # Unmount of a mount made before the restart
    status = json.loads(engine.run("volume", "inspect", "restart.data").stdout)[0]["Status"]
    assert status["mounts"] == 0
    engine.run("rm", "r1")
    engine.run("volume", "rm", "restart.data")
    assert "restart.data" not in engine.run("volume", "ls", "-q").stdout.split()


def test_bad_volume_names_come_back_as_one_line(world):
    _, engine, _ = world
    for bad in (".nodot", "app.bad/name", "app." + "x" * 70):
        p = engine.run("volume", "create", "-d", "dm", bad, check=False)
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "DOT[.SUBDOT][@BRANCH]" in lines[0], p.stderr
    p = engine.run("volume", "create", "-d", "dm", "-o", "size=10m", "opts.x", check=False)
    assert p.returncode != 0 and "take no options" in p.stderr


LOAD = ("trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); "
        "echo $i > /a/n.tmp && mv /a/n.tmp /a/n; echo $i >> /b/log; done")


def test_commits_under_load_from_a_container_restore_consistently(world):
    """The container writes /a/n, then appends the same number to /b/log: a state taken at
    one instant has log's last number equal to n, or one less."""
    dm, engine, _ = world
    engine.run("run", "-d", "--name", "loader", "--network", "none",
               "--volume-driver", "dm", "-v", "load.a:/a", "-v", "load.b:/b", IMAGE,
               "sh", "-c", LOAD)
    dm.ok("switch", "load")
    time.sleep(0.5)
    ids = [json.loads(dm.ok("commit", "-m", f"load {i}", "--json"))["id"] for i in range(8)]
    engine.run("rm", "-f", "loader")
    a, b = dm.path("load.a"), dm.path("load.b")
    for oid in ids:
        dm.ok("reset", "--hard", oid)
        n = int((a / "n").read_text())
        last = int((b / "log").read_text().split()[-1])
        assert last in (n, n - 1), (oid, n, last)


def _freezer_state(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
    return Path("/sys/fs/cgroup") / line.split(":", 2)[2].lstrip("/") / "cgroup.freeze"


def test_kill_during_the_freeze_leaves_no_container_paused(world):
    dm, engine, _ = world
    engine.run("volume", "create", "-d", "dm", "paused.db")
    big = dm.path("paused.db") / "big.db"
    big.write_bytes(bytes(96 << 20))
    engine.run("run", "-d", "--name", "pager", "--network", "none", "-v", "paused.db:/v",
               IMAGE, "sh", "-c", "trap 'exit 0' TERM; while true; do dd if=/dev/urandom "
               "of=/v/big.db bs=8192 count=1 seek=$((RANDOM % 12288)) conv=notrunc "
               "2>/dev/null; done")
    pid = int(engine.run("inspect", "-f", "{{.State.Pid}}", "pager").stdout)
    state = _freezer_state(pid)
    dm.ok("switch", "paused")
    try:
        kill_inside(lambda: dm.popen("commit", "-m", "killed in the freeze"),
                    lambda: "FROZEN" in state.read_text() or state.read_text().strip() == "1",
                    10, "a freeze")
        deadline = time.monotonic() + 30
        while engine.run("inspect", "-f", "{{.State.Paused}}", "pager").stdout.strip() != \
                "false":
            assert time.monotonic() < deadline, "the container was left paused"
            time.sleep(0.05)
        assert json.loads(dm.ok("fsck", "--json"))["ok"]
    finally:
        engine.run("rm", "-f", "pager")


def test_a_pull_moving_a_branch_a_container_is_pinned_to(world, tmp_path):
    """A container pinned to branch fix (app.db@fix) while fix is not checked out: a pull
    that moves fix is refused while it runs; with --stop-writers the container is stopped
    and started again on the pulled state (its folders were not dropped under it)."""
    dm, engine, _ = world
    hub = Hub(["--data", str(tmp_path / "hub")], tmp_path)
    hub.keys = {u: hub.user(u) for u in ("alice", "bob")}
    hub.start()
    try:
        hub.join(dm, "alice", hub.keys["alice"])
        dm.ok("init", "pin")
        (dm.path("pin.db") / "state").write_text("v1")
        dm.ok("switch", "pin")
        dm.ok("commit", "-m", "v1")
        dm.ok("checkout", "-b", "fix")
        (dm.path("pin.db") / "state").write_text("fix 1")
        dm.ok("commit", "-m", "fix 1")
        dm.ok("push", "hub", "pin")  # the checked-out branch, fix
        dm.ok("checkout", "master")
        bob = DM(tmp_path / "bob")
        hub.join(bob, "bob", hub.keys["bob"])
        hub.dm_hub("collaborator", "add", "alice/pin", "bob", "--role", "write")
        bob.ok("clone", "hub", "alice/pin", "fix")
        (bob.path("pin.db") / "state").write_text("fix 2")
        bob.ok("commit", "-m", "fix 2")
        bob.ok("push", "hub")
        engine.run("run", "-d", "--name", "pinned", "--network", "none", "-v",
                   "pin.db@fix:/d", IMAGE, "sh", "-c", "trap 'exit 0' TERM; while true; "
                   "do sleep 0.1; done")
        try:
            assert engine.run("exec", "pinned", "cat", "/d/state").stdout == "fix 1"
            p = dm("pull", "hub", "pin", "fix")
            assert p.returncode == 5 and "container pinned (pinned with @fix)" in p.stderr, \
                p.stderr
            assert engine.run("exec", "pinned", "cat", "/d/state").stdout == "fix 1"
            out = json.loads(dm.ok("pull", "hub", "pin", "fix", "--stop-writers", "--json"))
            assert out["status"] == "fast-forward", out
            assert "restarted container pinned on the pulled state of fix" in out["notes"]
            assert engine.run("exec", "pinned", "cat", "/d/state").stdout == "fix 2"
            assert json.loads(dm.ok("dot", "show", "pin", "--json"))["branch"] == "master"
            assert dm.ok("cat", "fix:db/state") == "fix 2"
        finally:
            engine.run("rm", "-f", "pinned")
    finally:
        hub.stop()
