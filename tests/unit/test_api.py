"""The Python API: what it exports, and its calls doing what dm's commands do (in-process,
on a store in a temporary folder)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

import dotmesh
from dotmesh import Conflict, NotFound, Repo, UsageError

EXPORTED = [
    "FORMAT_VERSION", "AlreadyExists", "Change", "CheckoutResult", "Commit", "CommitResult",
    "Conflict", "Corrupt",
    "Dot", "DotmeshError", "Forbidden", "InvalidName", "Locked", "LogEntry", "NotFound",
    "ObjectId", "Progress", "Ref", "Repo", "Report", "ResetResult", "Shown", "Tag", "Transfer",
    "Unauthorized", "UsageError", "Visit", "__version__",
]


def test_the_public_names_are_pinned_and_typed():
    assert dotmesh.__all__ == EXPORTED  # a change here is a change of the public API
    for name in EXPORTED:
        assert getattr(dotmesh, name) is not None
    with pytest.raises(AttributeError):
        dotmesh.NoSuchThing  # noqa: B018
    assert importlib.resources.files("dotmesh").joinpath("py.typed").is_file()


@pytest.fixture
def repo(tmp_path: Path):
    with Repo.open(tmp_path / "home") as r:
        yield r


def test_a_dot_is_committed_branched_tagged_and_reset_from_python(repo, tmp_path):
    app = repo.init("app")
    assert [d.name for d in repo.dots()] == ["app"] and app.head is None
    db = app.path("db")
    (db / "users").write_text("ann\n")
    first = app.commit("one user", metadata={"ticket": "T-1"})
    assert app.head == first.id and app.log()[0].commit.metadata["ticket"] == "T-1"
    assert app.tag("v1", message="the first").commit == first.id
    (db / "users").write_text("ann\nbob\n")
    assert [(c.status, c.path) for c in app.diff()] == [("changed", "users")]
    second = app.commit("two users")
    assert [e.id for e in app.log()] == [second.id, first.id]
    assert app.show("v1").id == first.id
    assert app.checkout("fix/login", create=True, at="v1").moved
    assert (app.path("db") / "users").read_text() == "ann\n"
    assert app.branch == "fix/login" and set(app.branches()) == {"master", "fix/login"}
    app.checkout("master")
    res = app.reset("HEAD^")
    assert res.new == first.id and (db / "users").read_text() == "ann\n"
    assert app.export("HEAD", tmp_path / "out") == ["db"]
    assert (tmp_path / "out" / "db" / "users").read_text() == "ann\n"
    assert app.delete_tag("v1").name == "v1" and app.tags() == {}
    with pytest.raises(NotFound):
        repo.dot("nope")
    with pytest.raises(NotFound):
        app.reset("no-such-ref")
    with pytest.raises(UsageError):
        app.commit("   ")


def test_at_visits_a_state_and_puts_back_exactly_what_was_there(repo):
    app = repo.init("app")
    db = app.path("db")
    (db / "rows").write_text("bug-42 state")
    bug = app.commit("the bug").id
    app.tag("bug-42")
    (db / "rows").write_text("newer")
    head = app.commit("newer").id
    (db / "rows").write_text("uncommitted work")  # a dirty working state, on entry
    (db / "scratch").write_text("new file")
    with app.at("bug-42") as visit:
        assert visit.target == bug and app.head == bug
        assert (db / "rows").read_text() == "bug-42 state" and not (db / "scratch").exists()
        (db / "rows").write_text("what the test did")
    assert app.branch == "master" and app.head == head
    assert (db / "rows").read_text() == "uncommitted work"
    assert (db / "scratch").read_text() == "new file"
    assert [c.path for c in app.diff()] == ["rows", "scratch"]  # still uncommitted

    with pytest.raises(RuntimeError), app.at(bug):  # a commit's id works as a ref
        raise RuntimeError("the test failed")  # put back all the same
    assert app.head == head and (db / "rows").read_text() == "uncommitted work"

    with app.at("bug-42") as visit:  # a failed test's state, kept on a branch
        (db / "rows").write_text("broken by the test")
        kept = app.keep(visit, "failed/test-x", "what test-x left")
    assert app.head == head and (db / "rows").read_text() == "uncommitted work"
    assert app.branches()["failed/test-x"] == kept
    assert app.log("failed/test-x")[0].commit.parents == (bug,)

    with pytest.raises(NotFound), app.at("no-such-state", fetch=False):
        pass
    assert app.head == head
    empty = repo.init("empty")
    with pytest.raises(NotFound, match="no commit"), empty.at("HEAD"):
        pass
    with pytest.raises(Conflict, match="moved to branch elsewhere"), app.at("bug-42"):
        app.checkout("elsewhere", create=True)  # the block left the branch: nothing moves
    assert app.branches()["elsewhere"] == bug and app.branches()["master"] == bug


def test_every_command_has_its_call(repo, tmp_path):
    """The calls behind dm status, ls, cat, reflog, branch -d, hook, subdot, config, fsck,
    gc, du, list, switch and dot delete (the CLI renders what these return)."""
    app = repo.init("app")
    assert repo.current().name == "app"
    (app.path("db") / "notes").mkdir()
    (app.path("db") / "notes" / "a.txt").write_text("alpha\n")
    first = app.commit("one note").id
    assert app.status().state == "clean" and repo.statuses()[0].name == "app"
    (app.path("db") / "notes" / "a.txt").write_text("beta\n")
    assert [(c.status, c.path) for c in app.status().changes] == [("changed", "notes/a.txt")]
    app.commit("two")
    top = app.ls("HEAD~1")
    assert top.entries == [] and top.subdots["db"].files == 1
    assert [p for p, _ in app.ls("HEAD~1:db", recursive=True).entries] == ["notes",
                                                                        "notes/a.txt"]
    assert b"".join(app.cat("HEAD~1:db/notes/a.txt")) == b"alpha\n"
    with pytest.raises(UsageError):
        app.cat("HEAD")  # names no file
    app.reset("HEAD~1")
    assert app.reflog(limit=1)[0].action == "reset" and app.head == first
    app.checkout("spike", create=True)
    app.checkout("master")
    assert app.delete_branch("spike") == first and "spike" not in app.branches()
    hook = app.add_hook("pre-freeze", "true", subdot="db")
    assert [h.id for h in app.hooks()] == [hook]
    app.remove_hook(hook)
    assert app.hooks() == []
    assert [(k.subdot, k.kind, k.kind_set) for k in app.subdot_kinds()] == [("db", "files",
                                                                           False)]
    app.set_kind("db", "sqlite")
    assert app.subdot_kinds()[0].kind_set
    assert repo.set_setting("snapshots.keep-days", 3) == 3 == repo.settings()[
        "snapshots.keep-days"]
    assert repo.set_setting("snapshots.keep-days", None) == repo.setting("snapshots.keep-days")
    assert set(repo.setting_help()) == set(repo.settings())
    checked = repo.fsck()
    assert checked.ok and checked.report.commits >= 2 and checked.repaired == []
    assert not repo.gc(dry_run=True).applied
    assert [u.name for u in repo.du(["app"]).dots] == ["app"]
    other = repo.init("other")
    assert repo.current().name == "app" and repo.switch("other").name == "other"
    with pytest.raises(UsageError):
        other.delete(force=False)  # as dm dot delete without -f
    other.delete()
    assert [d.name for d in repo.dots()] == ["app"] and repo.current() is None
    assert repo.remotes() == [] and repo.default_remote() is None and repo.mounts() == []
