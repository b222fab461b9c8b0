"""Sharing states: two developers (two stores) and a hub on loopback, embedded (SQLite and a
folder) and scaled out (two hub processes over PostgreSQL and SeaweedFS); S3 buckets as
remotes; interrupted transfers; refused pushes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dotmesh import Repo
from tests.conftest import DM, DM_BIN, flip_byte_of_largest_object, kill_inside
from tests.integration.remote_env import Hub, postgres_db

pytestmark = pytest.mark.slow  # hubs, PostgreSQL and SeaweedFS: minutes


@pytest.fixture(scope="module", params=["embedded", "scale-out"])
def hub(request, tmp_path_factory):
    top = tmp_path_factory.mktemp("hub")
    if request.param == "embedded":
        h = Hub(["--data", str(top / "data")], top)
        yield from _running(h)
    else:
        server = request.getfixturevalue("s3")
        server.bucket("dm-hub")
        with postgres_db(request.getfixturevalue("postgres")) as url:
            h = Hub(["--db", url, "--s3", server.spec("dm-hub"), "--data", str(top / "d")],
                    top, processes=2)
            h.s3, h.bucket = server, "dm-hub"
            yield from _running(h)


def _running(h: Hub):
    h.keys = {u: h.user(u) for u in ("alice", "bob", "carol")}
    h.start()
    try:
        yield h
    finally:
        h.stop()


def _dev(tmp_path: Path, name: str, hub: Hub, i: int = 0) -> DM:
    dm = DM(tmp_path / name)
    hub.join(dm, name, hub.keys[name], i)
    return dm


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_alice_pushes_bob_clones_and_pushes_back(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub, 0)
    bob = _dev(tmp_path, "bob", hub, 1)  # the other hub process when scaled out
    alice.ok("init", "shared")
    db, up = alice.path("shared.db"), alice.path("shared.uploads")
    (db / "pages.db").write_bytes(os.urandom(64 << 10) * 40)  # paged, 2.5 MiB
    (db / "heap").write_bytes(os.urandom(20 << 20))  # 2,560 blocks: fetched in two parts
    (up / "a.txt").write_text("first upload")
    (up / "link").symlink_to("a.txt")
    alice.ok("commit", "-m", "first")
    out = json.loads(alice.ok("push", "--json"))
    assert out["status"] == "pushed" and out["remote_dot"] == "alice/shared"
    assert json.loads(alice.ok("push", "--json"))["status"] == "up to date"

    assert bob("clone", "hub", "alice/shared").returncode == 13  # not a collaborator yet
    hub.dm_hub("collaborator", "add", "alice/shared", "bob")
    out = json.loads(bob.ok("clone", "hub", "alice/shared", "--json"))
    assert out["status"] == "cloned"
    assert json.loads(bob.ok("dot", "show", "shared", "--json"))["remotes"] == {
        "hub": "alice/shared"}
    assert _files(bob.path("shared.db")) == _files(db)
    assert os.readlink(bob.path("shared.uploads") / "link") == "a.txt"
    _blocks_lie_in_file_order(bob.home, "shared", "db", "heap")
    with open(bob.path("shared.db") / "pages.db", "r+b") as f:  # one page changes
        f.seek(8192 * 7)
        f.write(os.urandom(8192))
    (bob.path("shared.uploads") / "b.txt").write_text("bob's upload")
    bob.ok("commit", "-m", "bob's change")
    pushed = json.loads(bob.ok("push", "--json"))  # goes back to alice/shared
    assert pushed["remote_dot"] == "alice/shared" and pushed["status"] == "pushed"
    assert pushed["bytes"] < 64 << 10  # one page and what names it, not the whole file

    pulled = json.loads(alice.ok("pull", "--json"))
    assert pulled["status"] == "fast-forward" and pulled["new"] == pushed["new"]
    assert _files(db) == _files(bob.path("shared.db"))
    assert (up / "b.txt").read_text() == "bob's upload"
    assert [c["message"] for c in json.loads(alice.ok("log", "--json"))] == [
        "bob's change", "first"]
    assert json.loads(alice.ok("fsck", "--json"))["ok"]
    assert json.loads(bob.ok("fsck", "--json"))["ok"]


def _blocks_lie_in_file_order(home: Path, dot: str, subdot: str, name: str) -> None:
    """A fetched file's blocks were written back to back, in the order of its list (in
    parts of CHUNK_FETCH blocks, each flushed: a break between them): a restore then reads
    them in runs (fetched in id order, a checkout of a 2 GiB clone read
    every block by itself and took 3 times as long)."""
    from dotmesh.model.objects import FileList, Tree
    from dotmesh.store.packs import RECORD
    from dotmesh.store.repo import Repo as Store

    repo = Store(home)
    try:
        root = repo.commit(repo.head(dot, repo.branch(dot))).subdots[subdot]
        [entry] = [e for e in Tree.decode(repo.packs.get(root.tree)).entries
                   if e.name == name]
        ids = [c for c, _ in FileList.decode(repo.packs.get(entry.ref)).chunks]
        locs = repo.packs.locate_many(ids)
        at = [(locs[c].pack, locs[c].offset, locs[c].stored_len) for c in ids]
        breaks = [i for i, (a, b) in enumerate(zip(at, at[1:], strict=False))
                  if b[:2] != (a[0], a[1] + a[2] + RECORD.size)]
        assert len(breaks) <= 1  # where the second part of the fetch began
    finally:
        repo.close()


def test_only_keys_the_hub_knows_and_collaborators_get_in(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    alice.ok("init", "private")
    (alice.path("private") / "f").write_text("secret")
    alice.ok("commit", "-m", "mine")
    alice.ok("push")
    stranger = DM(tmp_path / "stranger")
    p = subprocess.run([DM_BIN, "remote", "add", "hub", hub.address("alice"), "--http"],
                       env={**stranger.env, "DM_API_KEY": "dmk_wrong"}, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 12 and "does not know this API key" in p.stderr
    assert stranger.ok("remote").startswith("No remotes")
    carol = _dev(tmp_path, "carol", hub)
    p = carol("clone", "hub", "alice/private")
    assert p.returncode == 13 and "only its owner and collaborators" in p.stderr
    carol.ok("init", "private")
    (carol.path("private") / "f").write_text("overwrite")
    carol.ok("commit", "-m", "carol's")
    p = carol("push", "--remote-name", "alice/private")
    assert p.returncode == 13
    assert alice.ok("pull") .count("up to date") == 1  # nothing changed on the hub
    without_key = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://127.0.0.1:{hub.ports[0]}/api/v1/dots/alice/private"],
                                 capture_output=True, text=True)
    assert without_key.stdout == "401"


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # client-side: one hub shows it
def test_diverged_branches_are_refused_with_a_way_out(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    bob = _dev(tmp_path, "bob", hub, 1)
    alice.ok("init", "race")
    (alice.path("race") / "f").write_text("base")
    alice.ok("commit", "-m", "base")
    alice.ok("push")
    hub.dm_hub("collaborator", "add", "alice/race", "bob")
    bob.ok("clone", "hub", "alice/race")
    (bob.path("race") / "f").write_text("bob")
    bob.ok("commit", "-m", "bob")
    bob.ok("push")
    (alice.path("race") / "f").write_text("alice")
    alice.ok("commit", "-m", "alice")
    p = alice("push")
    assert p.returncode == 5 and "dm pull" in p.stderr and "--force" in p.stderr
    p = alice("pull")
    assert p.returncode == 5 and "dm checkout -b" in p.stderr and "reset --hard" in p.stderr
    assert (alice.path("race") / "f").read_text() == "alice"  # nothing moved
    hint = p.stderr.split("reset --hard ")[1].split()[0]
    alice.ok("checkout", "-b", "mine")
    alice.ok("checkout", "master")
    alice.ok("reset", "--hard", hint)  # the fetched state is reachable by its id
    assert (alice.path("race") / "f").read_text() == "bob"
    alice.ok("checkout", "mine")
    assert json.loads(alice.ok("push", "--branch", "mine", "--json"))["status"] == "pushed"
    alice.ok("push", "--branch", "mine", "--force")
    assert json.loads(alice.ok("fsck", "--json"))["ok"]


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # client-side: one hub shows it
def test_dotmesh_habits_upstream_own_namespace_pull_all_and_stash_on_divergence(
        hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    bob = _dev(tmp_path, "bob", hub, 1)
    alice.ok("init", "compat")
    f = alice.path("compat") / "f"
    f.write_text("base")
    alice.ok("commit", "-m", "base")
    assert "alice/habits" in alice.ok("dot", "set-upstream", "hub", "habits")  # her own
    assert alice("dot", "set-upstream", "nohub", "x").returncode == 3
    assert json.loads(alice.ok("push", "--json"))["remote_dot"] == "alice/habits"
    assert json.loads(alice.ok("dot", "show", "--json"))["remotes"] == {"hub": "alice/habits"}
    again = json.loads(alice.ok("clone", "hub", "habits", "--local-name", "again",
                                "--stash-on-divergence", "--json"))  # a no-op for a clone
    assert again["remote_dot"] == "alice/habits" and again["status"] == "cloned"
    alice.ok("dot", "set-upstream", "again", "hub", "nothing-here")
    pulled = json.loads(alice.ok("pull", "hub", "again", "--remote-name", "habits", "--json"))
    assert pulled["status"] == "up to date"
    assert json.loads(alice.ok("dot", "show", "again", "--json"))["remotes"] == {
        "hub": "alice/habits"}  # remembered

    hub.dm_hub("collaborator", "add", "alice/habits", "bob")
    bob.ok("clone", "hub", "alice/habits")
    bob.ok("checkout", "-b", "feature")
    bob.ok("commit", "-m", "feature")
    bob.ok("push", "--branch", "feature")
    bob.ok("checkout", "master")
    (bob.path("habits") / "f").write_text("bob")
    bob.ok("commit", "-m", "bob")
    bob.ok("push")
    f.write_text("alice")
    alice.ok("commit", "-m", "alice")
    mine = json.loads(alice.ok("log", "--json"))[0]["id"]

    p = alice("pull", "--all", "--json")  # feature is created, master diverged: refused
    assert p.returncode == 5 and "master" in p.stderr
    report = {r["branch"]: r for r in json.loads(p.stdout)}
    assert report["feature"]["status"] == "created" and report["master"]["status"] == "refused"
    assert "--stash-on-divergence" in report["master"]["notes"][0]
    assert f.read_text() == "alice"  # nothing moved
    f.write_text("alice, uncommitted")
    out = json.loads(alice.ok("pull", "--stash-on-divergence", "--json"))
    assert out["status"] == "stashed" and out["stashed"] == f"stash/master-{mine[:8]}"
    assert f.read_text() == "bob" and out["saved"]  # the working state: saved, as by reset
    assert alice.ok("cat", f"{out['stashed']}:f") == "alice"
    assert alice.ok("cat", f"{out['saved']}:f") == "alice, uncommitted"
    assert "feature" in json.loads(alice.ok("dot", "show", "--json"))["branches"]

    f.write_text("alice again")  # on bob's: now bob's newer commit diverges on the hub
    alice.ok("commit", "-m", "alice again")
    (bob.path("habits") / "f").write_text("bob again")
    bob.ok("commit", "-m", "bob again")
    bobs = json.loads(bob.ok("push", "--json"))["new"]
    p = alice("push")
    assert p.returncode == 5 and "--stash-on-divergence" in p.stderr
    text = alice.ok("push", "--stash-on-divergence")
    assert f"kept on hub on branch stash/master-{bobs[:8]}" in text, text
    p = bob("pull", "--all", "--json")  # the stash comes as a branch; master is refused
    report = {r["branch"]: r for r in json.loads(p.stdout)}
    assert p.returncode == 5 and report["master"]["status"] == "refused"
    assert report[f"stash/master-{bobs[:8]}"]["new"] == bobs  # bob's commit, on the hub
    out = json.loads(bob.ok("pull", "--stash-on-divergence", "--json"))
    assert out["stashed"] == f"stash/master-{bobs[:8]}"  # the same branch: taken as it is
    assert (bob.path("habits") / "f").read_text() == "alice again"
    assert json.loads(bob.ok("fsck", "--json"))["ok"]


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # client-side: one hub shows it
def test_a_pull_moving_a_branch_whose_folders_a_process_uses(hub, tmp_path):
    """Branch fix is not checked out here, but a process works in its parked folder: a pull
    that moves fix would pull the folder from under it, so it is refused, naming the
    process; --stop-writers stops it and moves the branch."""
    alice = _dev(tmp_path, "alice", hub)
    bob = _dev(tmp_path, "bob", hub, 0)
    alice.ok("init", "parked")
    (alice.path("parked") / "f").write_text("one")
    alice.ok("commit", "-m", "one")
    alice.ok("checkout", "-b", "fix")
    (alice.path("parked") / "f").write_text("fix one")
    alice.ok("commit", "-m", "fix one")
    alice.ok("push", "hub", "parked", "fix")
    alice.ok("checkout", "master")
    alice.ok("push", "hub", "parked", "master")
    hub.dm_hub("collaborator", "add", "alice/parked", "bob")
    bob.ok("clone", "hub", "alice/parked")
    bob.ok("pull", "--all")
    bob.ok("checkout", "fix")
    bob.ok("checkout", "master")  # fix's folder is parked, kept for the next checkout
    from dotmesh.store.repo import Repo as Store  # noqa: PLC0415 - where dm keeps it

    store = Store(bob.home)
    folder = store.parked("parked", "fix", "__default__")
    store.close()
    assert (folder / "f").read_text() == "fix one"
    alice.ok("checkout", "fix")
    (alice.path("parked") / "f").write_text("fix two")
    alice.ok("commit", "-m", "fix two")
    alice.ok("push", "hub", "parked", "fix")
    head = json.loads(bob.ok("log", "fix", "--json"))[0]["id"]

    user = subprocess.Popen(["sleep", "300"], cwd=folder)
    try:
        p = bob("pull", "hub", "parked", "fix")
        assert p.returncode != 0 and "in use by" in p.stderr and "sleep" in p.stderr, p.stderr
        assert "--stop-writers" in p.stderr and "Traceback" not in p.stderr
        assert json.loads(bob.ok("log", "fix", "--json"))[0]["id"] == head  # not moved
        assert (folder / "f").read_text() == "fix one" and user.poll() is None
        bob.ok("pull", "hub", "parked", "fix", "--stop-writers")
        assert user.wait(timeout=30) is not None  # stopped
    finally:
        user.kill()
        user.wait()
    assert json.loads(bob.ok("log", "fix", "--json"))[0]["message"] == "fix two"
    bob.ok("checkout", "fix")
    assert (bob.path("parked") / "f").read_text() == "fix two"


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # client-side: one hub shows it
def test_tags_and_branches_named_with_parts_travel_with_their_dot(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    bob = _dev(tmp_path, "bob", hub, 1)
    alice.ok("init", "lib")
    folder = alice.path("lib")
    (folder / "state").write_text("v1")
    alice.ok("commit", "-m", "v1")
    alice.ok("tag", "release/v1", "-m", "shipped")
    alice.ok("checkout", "-b", "fix/login")
    (folder / "state").write_text("the bug")
    alice.ok("commit", "-m", "reproduces the bug")
    alice.ok("tag", "bug-42", "-m", "cannot log in")  # on a branch that is not pushed
    alice.ok("checkout", "master")
    out = json.loads(alice.ok("push", "--json"))
    assert out["status"] == "pushed" and out["tags"] == ["bug-42", "release/v1"]
    assert json.loads(alice.ok("push", "--json"))["tags"] == []  # nothing new
    hub.dm_hub("collaborator", "add", "alice/lib", "bob")

    out = json.loads(bob.ok("clone", "hub", "alice/lib", "--json"))
    assert out["tags"] == ["bug-42", "release/v1"]
    tags = {t["name"]: t for t in json.loads(bob.ok("tag", "--json"))}
    assert tags["bug-42"]["message"] == "cannot log in"
    assert tags["bug-42"]["commit"] == json.loads(alice.ok("show", "bug-42", "--json"))["id"]
    assert bob.ok("cat", "bug-42:state") == "the bug"  # its commit came though no branch did
    bob.ok("checkout", "-b", "look", "bug-42")
    assert (bob.path("lib") / "state").read_text() == "the bug"

    alice.ok("checkout", "fix/login")  # a branch named with parts, pushed and pulled
    (alice.path("lib") / "state").write_text("fixed")
    alice.ok("commit", "-m", "fixed")
    alice.ok("push", "--branch", "fix/login")
    assert json.loads(bob.ok("pull", "hub", "lib", "fix/login", "--json"))["status"] == "created"
    assert bob.ok("cat", "fix/login:state") == "fixed"

    alice.ok("tag", "-f", "bug-42")  # moved here to the fix: the hub's names another commit
    p = alice("push")
    assert p.returncode == 5 and "tag bug-42" in p.stderr and "--force" in p.stderr, p.stderr
    assert json.loads(alice.ok("push", "--no-tags", "--json"))["tags"] == []
    alice.ok("tag", "demo", "HEAD^")
    assert json.loads(alice.ok("push", "--force", "--json"))["tags"] == ["bug-42", "demo"]
    p = bob("pull", "hub", "lib", "master")
    assert p.returncode == 0 and "up to date; tags taken: demo" in p.stdout, p.stderr
    assert "tag bug-42 names" in p.stderr and "kept yours" in p.stderr  # bob's stays put
    assert bob.ok("cat", "bug-42:state") == "the bug"

    # From Python, a state that is only on the hub is fetched for the block, and the state
    # before comes back after it.
    alice.ok("tag", "only-there", "fix/login~1")
    alice.ok("push", "--branch", "fix/login")
    with Repo.open(bob.home) as repo:
        lib = repo.dot("lib")
        before = lib.head
        with lib.at("only-there"):
            assert (bob.path("lib") / "state").read_text() == "the bug"
        assert lib.head == before and "only-there" in lib.tags()
    assert (bob.path("lib") / "state").read_text() == "the bug"  # look's: bug-42's state
    assert json.loads(bob.ok("fsck", "--json"))["ok"]


def _big_dot(dm: DM, name: str, mib: int) -> None:
    dm.ok("init", name)
    dm.ok("switch", name)
    d = dm.path(f"{name}.data")
    for i in range(mib // 8):
        (d / f"blob{i}.bin").write_bytes(os.urandom(8 << 20))
    dm.ok("commit", "-m", "big", "--no-freeze")


def _kill_midway(dm: DM, args: list[str], marker) -> None:
    """Run ``dm args`` and kill -9 it as soon as ``marker()`` says the transfer is under way
    (one try: a transfer that finished leaves nothing to resume)."""
    kill_inside(lambda: dm.popen(*args), marker, 1, "a transfer")


@pytest.mark.parametrize("hub", ["scale-out"], indirect=True)  # two hub processes, S3
def test_an_interrupted_push_and_clone_resume(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    _big_dot(alice, "resume", 96)  # 4 batches of a push: a 4th is still to come at the 3rd
    before = hub.packs()
    _kill_midway(alice, ["push"], lambda: hub.packs() >= before + 3)
    out = json.loads(alice.ok("push", "--json"))
    assert 0 < out["bytes"] < 94 << 20, out  # only what had not arrived
    bob = _dev(tmp_path, "bob", hub)
    hub.dm_hub("collaborator", "add", "alice/resume", "bob")
    packs = bob.home / "packs"
    _kill_midway(bob, ["clone", "hub", "alice/resume"],
                 lambda: packs.exists() and sum(p.stat().st_size for p in packs.iterdir())
                 > 20 << 20)
    assert "resume" not in bob.ok("list")  # no dot until the clone is complete
    out = json.loads(bob.ok("clone", "hub", "alice/resume", "--json"))
    assert 0 < out["bytes"] < 94 << 20, out
    assert _files(bob.path("resume.data")) == _files(alice.path("resume.data"))
    assert json.loads(bob.ok("fsck", "--json"))["ok"]


def test_a_push_to_a_bucket_checks_each_object_it_reads_before_sending_it(s3, tmp_path):
    """A bucket keeps what it is sent: a byte gone bad in a pack (on btrfs packs keep no data
    checksums of their own) fails the push instead of reaching the backup."""
    s3.bucket("dm-damaged")
    alice, bob = DM(tmp_path / "alice"), DM(tmp_path / "bob")
    for who in (alice, bob):
        who.ok("s3", "remote", "add", "bucket", s3.spec("dm-damaged"))
    alice.ok("init", "app")
    (alice.path("app.db") / "rows").write_bytes(os.urandom(200_000))
    alice.ok("commit", "-m", "one")
    flip_byte_of_largest_object(alice, 100)
    p = alice("push")
    assert p.returncode == 7 and "fails its hash check" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1
    assert bob("clone", "bucket", "app").returncode != 0  # no state named there


def test_a_hub_refuses_a_damaged_object_a_push_sends(hub, tmp_path):
    """The pusher leaves the check to the hub, which hashes every object it is sent."""
    alice = _dev(tmp_path, "alice", hub)
    alice.ok("init", "damaged")
    (alice.path("damaged.db") / "rows").write_bytes(os.urandom(200_000))
    alice.ok("commit", "-m", "one")
    flip_byte_of_largest_object(alice, 100)
    p = alice("push")
    assert p.returncode != 0 and "does not match its id" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1


def test_an_s3_bucket_is_a_remote(s3, tmp_path):
    s3.bucket("dm-team")
    alice, bob = DM(tmp_path / "alice"), DM(tmp_path / "bob")
    assert "Added remote bucket" in alice.ok("s3", "remote", "add", "bucket",
                                              s3.spec("dm-team"))
    key, _, rest = s3.spec("dm-team").partition(":")  # the secret apart, as documented
    p = subprocess.run([DM_BIN, "s3", "remote", "add", "bucket", f"{key}@{rest.split('@')[1]}"],
                       env={**bob.env, "DM_S3_SECRET_KEY": rest.split("@")[0]},
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "Added remote bucket" in p.stdout, p.stderr
    alice.ok("init", "app")
    (alice.path("app.db") / "rows").write_bytes(os.urandom(8192) * 30)
    alice.ok("commit", "-m", "in the bucket")
    alice.ok("tag", "release/v1", "-m", "shipped")
    out = json.loads(alice.ok("push", "--json"))
    assert out["status"] == "pushed" and out["remote_dot"] == "app"
    assert out["tags"] == ["release/v1"]
    assert json.loads(bob.ok("clone", "bucket", "app", "--json"))["tags"] == ["release/v1"]
    assert json.loads(bob.ok("tag", "--json"))[0]["message"] == "shipped"
    assert _files(bob.path("app.db")) == _files(alice.path("app.db"))
    (bob.path("app.db") / "more").write_text("bob")
    bob.ok("commit", "-m", "bob")
    bob.ok("push")
    assert json.loads(alice.ok("pull", "--json"))["status"] == "fast-forward"
    assert (alice.path("app.db") / "more").read_text() == "bob"
    (alice.path("app.db") / "more").write_text("alice")
    alice.ok("commit", "-m", "alice")
    (bob.path("app.db") / "more").write_text("bob again")
    bob.ok("commit", "-m", "bob again")
    alice.ok("push")
    assert bob("push").returncode == 5  # would lose alice's commit
    _big_dot(alice, "large", 72)  # 3 batches, each a pack and its index: 4 blobs, 1 to go
    _kill_midway(alice, ["push", "bucket", "large"],
                 lambda: s3.count("dm-team", "dots/large/packs/") >= 4)
    out = json.loads(alice.ok("push", "bucket", "large", "--json"))
    assert 0 < out["bytes"] < 71 << 20, out
    bob.ok("clone", "bucket", "large")
    assert _files(bob.path("large.data")) == _files(alice.path("large.data"))
    assert json.loads(bob.ok("fsck", "--json"))["ok"]


def test_conditional_writes_keep_concurrent_pushers_commits(s3):
    """Two pushers race on one ref: If-Match lets exactly one of them win each round."""
    from concurrent.futures import ThreadPoolExecutor

    from dotmesh.errors import Conflict
    from dotmesh.remote.blobs import S3Blobs
    from tests.integration.remote_env import S3_KEY, S3_SECRET

    s3.bucket("dm-race")
    blobs = S3Blobs(s3.endpoint, "dm-race", S3_KEY, S3_SECRET)
    blobs.put_if("refs/master", b"0", None)

    def bump(_: int) -> bool:
        data, version = blobs.read_versioned("refs/master")
        try:
            blobs.put_if("refs/master", str(int(data) + 1).encode(), version)
            return True
        except Conflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = sum(pool.map(bump, range(40)))
    assert int(blobs.get("refs/master")) == won  # no increment was lost
    with pytest.raises(Conflict):
        blobs.put_if("refs/master", b"x", None)  # If-None-Match: * on an existing key


def test_a_hub_over_tls(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    pem, key, ca_pem = tmp_path / "hub.pem", tmp_path / "hub.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(pem)
    cert.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_pem)
    h = Hub(["--data", str(tmp_path / "data")], tmp_path, tls=(pem, key, ca_pem))
    alice_key = h.user("alice")
    h.start()
    try:
        alice = DM(tmp_path / "alice")
        p = subprocess.run([DM_BIN, "remote", "add", "hub", h.address("alice")],
                           env={**alice.env, "DM_API_KEY": alice_key}, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        assert p.returncode == 14 and "certificate" in p.stderr  # not trusted by default
        h.join(alice, "alice", alice_key)
        alice.ok("init", "tls")
        (alice.path("tls") / "f").write_text("over TLS")
        alice.ok("commit", "-m", "tls")
        assert json.loads(alice.ok("push", "--json"))["status"] == "pushed"
    finally:
        h.stop()


def test_remote_add_asks_for_the_key_on_a_terminal(hub, tmp_path):
    import pty

    dm = DM(tmp_path / "tty")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([DM_BIN, "remote", "add", "hub", hub.address("carol"), "--http"],
                            env=dm.env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 30
    while b"API key" not in out and time.monotonic() < deadline:
        out += os.read(leader, 1024)
    os.write(leader, hub.keys["carol"].encode() + b"\n")
    assert proc.wait(timeout=30) == 0
    rest = b""
    try:
        while chunk := os.read(leader, 1024):
            rest += chunk
    except OSError:
        pass
    os.close(leader)
    assert hub.keys["carol"].encode() not in rest  # typed, not echoed
    assert b"signed in as carol" in rest


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # client-side: one hub shows it
def test_a_clone_killed_while_building_its_folders_is_finished_by_running_it_again(
        hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    alice.ok("init", "many")
    d = alice.path("many.files")
    for i in range(3000):
        (d / f"f{i}").write_bytes(os.urandom(2000))
    alice.ok("commit", "-m", "many files")
    alice.ok("push")
    bob = _dev(tmp_path, "bob", hub)
    hub.dm_hub("collaborator", "add", "alice/many", "bob")

    def building() -> bool:  # the dot is recorded, its folders are being built
        folder = bob.home / "dots" / "many" / "tmp"
        return folder.exists() and any(folder.iterdir())

    kill_inside(lambda: bob.popen("clone", "hub", "alice/many"), building, 5,
                "a clone's restore")
    out = json.loads(bob.ok("clone", "hub", "alice/many", "--json"))
    assert out["status"] == "cloned"
    assert _files(bob.path("many.files")) == _files(d)
    assert json.loads(bob.ok("list", "--json"))[0]["state"] == "clean"
    assert json.loads(bob.ok("fsck", "--json"))["ok"]
    assert bob("clone", "hub", "alice/many").returncode == 4  # done: now it exists
