"""The volume plugin's handlers, without dockerd: answers, errors, and persisted mounts."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from dotmesh.errors import InvalidName
from dotmesh.model.names import DockerVolume
from dotmesh.server.plugin import Plugin
from dotmesh.store.repo import Repo
from tests.conftest import DM, DM_BIN


@pytest.fixture
def plugin(tmp_path):
    home = Repo(tmp_path / "home")
    yield Plugin(home, lambda line: None)
    home.close()


def test_a_volume_lives_as_a_subdot(plugin, tmp_path):
    assert plugin.call("Plugin.Activate", {}) == {"Implements": ["VolumeDriver"]}
    assert plugin.call("VolumeDriver.Get", {"Name": "proj_app.db"})["Err"]  # not ours yet
    assert plugin.call("VolumeDriver.Create", {"Name": "proj_app.db", "Opts": None}) == {
        "Err": ""}
    assert plugin.call("VolumeDriver.Create", {"Name": "proj_app.db", "Opts": {}}) == {
        "Err": ""}  # again: fine
    got = plugin.call("VolumeDriver.Mount", {"Name": "proj_app.db", "ID": "m1"})
    mountpoint = got["Mountpoint"]
    assert got["Err"] == "" and mountpoint.startswith("/")
    assert mountpoint == str(tmp_path / "home" / "dots" / "proj_app" / "subdots" / "db")
    vol = plugin.call("VolumeDriver.Get", {"Name": "proj_app.db"})["Volume"]
    assert vol["Status"] == {"dot": "proj_app", "subdot": "db", "branch": "master",
                             "pinned": False, "mounts": 1}
    assert plugin.call("VolumeDriver.Path", {"Name": "proj_app.db"})["Mountpoint"] == mountpoint
    assert plugin.call("VolumeDriver.List", {})["Volumes"] == [
        {"Name": "proj_app.db", "Mountpoint": mountpoint}]

    # a new server process (a restart) still knows the mount
    again = Plugin(Repo(tmp_path / "home"), lambda line: None)
    assert again.call("VolumeDriver.Get", {"Name": "proj_app.db"})["Volume"]["Status"][
        "mounts"] == 1
    assert again.call("VolumeDriver.Unmount", {"Name": "proj_app.db", "ID": "m1"}) == {
        "Err": ""}
    assert again.call("VolumeDriver.Unmount", {"Name": "proj_app.db", "ID": "never"}) == {
        "Err": ""}  # ids it never saw are fine
    (tmp_path / "home" / "dots" / "proj_app" / "subdots" / "db" / "f").write_text("x")
    assert again.call("VolumeDriver.Remove", {"Name": "proj_app.db"}) == {"Err": ""}
    assert again.call("VolumeDriver.List", {})["Volumes"] == []
    assert again.call("VolumeDriver.Get", {"Name": "proj_app.db"})["Err"]


@pytest.mark.parametrize("body, err", [
    ({"Name": ".db"}, "dot name must not be empty"),
    ({"Name": "app.a/b"}, "may only contain"),
    ({"Name": "app.db", "Opts": {"size": "1g"}}, "take no options (got size)"),
    ({}, "no volume Name"),
])
def test_bad_creates_get_one_line(plugin, body, err):
    out = plugin.call("VolumeDriver.Create", body)
    assert err in out["Err"] and "\n" not in out["Err"]


def test_unknown_methods_and_names(plugin):
    assert "does not implement" in plugin.call("VolumeDriver.Snapshot", {})["Err"]
    assert plugin.call("VolumeDriver.Get", {"Name": "no dot here!"})["Err"].startswith(
        "no such volume")
    assert plugin.call("VolumeDriver.Mount", {"Name": "ghost.x", "ID": "1"})["Err"]


def test_dotmesh_volume_names_root_pinned_branches_and_the_namespace(plugin):
    from pathlib import Path

    from dotmesh.ops import checkout as checkout_ops
    from dotmesh.ops import commit as commit_ops
    from dotmesh.ops import dots
    from dotmesh.workdir.branches import working_set

    home = plugin.home

    def ok(method: str, name: str, **more: str) -> dict:
        out = plugin.call(f"VolumeDriver.{method}", {"Name": name, **more})
        assert out["Err"] == "", out
        return out

    ok("Create", "admin/app.db")  # Dotmesh's local namespace: the same dot
    (home.stable("app", "db") / "f").write_text("master")
    commit_ops.commit(home, "app", "one", {}, freeze=False)
    checkout_ops.checkout(home, "app", "fix", create=True)  # master's folders are parked
    (home.stable("app", "db") / "f").write_text("fix, uncommitted")

    ok("Create", "app.db@master")
    pinned = ok("Mount", "app.db@master", ID="p1")["Mountpoint"]
    assert pinned == str(home.parked("app", "master", "db"))
    assert (Path(pinned) / "f").read_text() == "master"
    assert ok("Path", "app.db@fix")["Mountpoint"] == str(home.stable("app", "db"))  # current
    assert ok("Get", "app.db@master")["Volume"]["Status"] == {
        "dot": "app", "subdot": "db", "branch": "master", "pinned": True, "mounts": 1}
    ok("Create", "app.__root__")  # the whole dot: a folder per subdot
    root = ok("Mount", "app.__root__", ID="r1")["Mountpoint"]
    assert root == str(working_set(home, "app")) and (Path(root) / "db" / "f").exists()
    assert ok("Path", "admin/app.__root__@master")["Mountpoint"] == str(
        home.parked_set("app", "master"))
    home.create_branch("app", "never-out", home.head("app", "master"))  # no folders yet
    ok("Create", "app.db@never-out")
    built = Path(ok("Path", "app.db@never-out")["Mountpoint"])
    assert built == home.parked("app", "never-out", "db") and (built / "f").read_text() == (
        "master")

    ok("Remove", "app.db@master")  # a view of the subdot: nothing is deleted
    ok("Remove", "app.__root__")
    assert (Path(pinned) / "f").read_text() == "master" and (Path(root) / "db").is_dir()
    assert plugin.call("VolumeDriver.List", {})["Volumes"] == [
        {"Name": "app.db", "Mountpoint": str(home.stable("app", "db"))}]
    for name, err in [("app.db@nobranch", "no branch 'nobranch'"),
                      ("bob/app.db", "one namespace"), ("app.db@a//b", "parts joined"),
                      ("ghost.db@master", "no branch"), ("app.__root__.x", "may only")]:
        out = plugin.call("VolumeDriver.Create", {"Name": name})
        assert err in out["Err"] and "\n" not in out["Err"], (name, out)
    assert "no such volume" in plugin.call("VolumeDriver.Get", {"Name": "app.db@nope"})["Err"]
    assert not home.dot_exists("ghost") and sorted(home.branches("app")) == [
        "fix", "master", "never-out"]
    with pytest.raises(InvalidName, match="reserved"):
        dots.path(home, "app.__root__")  # not a subdot's name
    for name in ["app", "app.db", "app@fix/login", "app.__root__@master", "app.db@x"]:
        assert str(DockerVolume.parse(name)) == name
    assert DockerVolume.parse("admin/app.__root__") == DockerVolume("app", None)


def test_install_writes_a_unit(tmp_path):
    dm = DM(tmp_path / "home")
    unit = tmp_path / "dm.service"
    out = dm.ok("serve", "--install", "--unit-path", str(unit))
    assert "systemctl" in out
    text = unit.read_text()
    assert f"Environment=DM_HOME={tmp_path / 'home'}" in text
    assert "serve --socket /run/docker/plugins/dm.sock" in text
    assert "Before=docker.service" in text


def test_the_server_on_its_socket(tmp_path):
    """One server per socket; malformed bodies get an Err; SIGTERM removes the socket."""
    dm = DM(tmp_path / "home")
    sock = tmp_path / "dm.sock"
    first = subprocess.Popen([DM_BIN, "serve", "--socket", str(sock), "--quiet"], env=dm.env,
                             stdin=subprocess.DEVNULL)

    def post(method: str, body: bytes) -> dict[str, object]:
        p = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "-X", "POST",
                            "--data-binary", "@-", f"http://dm/{method}"], input=body,
                           capture_output=True)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    try:
        for _ in range(400):
            if sock.exists():
                break
            time.sleep(0.05)
        assert post("Plugin.Activate", b"") == {"Implements": ["VolumeDriver"]}
        assert "bad request body" in str(post("VolumeDriver.Create", b"{not json")["Err"])
        assert post("VolumeDriver.Create", b'{"Name": "a.b"}') == {"Err": ""}
        p = dm("serve", "--socket", str(sock))
        assert p.returncode == 4 and "already answers" in p.stderr
    finally:
        first.terminate()
        first.wait(timeout=30)
    assert not sock.exists()


def test_a_dot_made_by_docker_is_current_and_removed_volumes_leave_it_dirty(tmp_path):
    """The tutorial's order: docker-compose up makes the dot, dm commit needs it current;
    docker-compose down -v removes the volumes, and dm list must not call that clean."""
    from dotmesh.ops import commit as commit_ops
    from dotmesh.ops import dots

    home = Repo(tmp_path / "home")
    try:
        plugin = Plugin(home, lambda line: None)
        assert plugin.call("VolumeDriver.Create", {"Name": "moby-counter_app.db"})["Err"] == ""
        assert plugin.call("VolumeDriver.Create", {"Name": "other.db"})["Err"] == ""
        assert home.current_dot() == "moby-counter_app"  # the first one made, as dm init
        (home.stable("moby-counter_app", "db") / "rows").write_text("x")
        commit_ops.commit(home, "moby-counter_app", "before down -v")
        [status] = dots.statuses(home, ["moby-counter_app"])
        assert status.state == "clean"
        assert plugin.call("VolumeDriver.Remove", {"Name": "moby-counter_app.db"})["Err"] == ""
        [status] = dots.statuses(home, ["moby-counter_app"])
        assert status.state == "dirty"  # dm diff shows the subdot's files removed
    finally:
        home.close()
