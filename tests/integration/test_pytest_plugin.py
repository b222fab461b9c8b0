"""The pytest plugin, as a user's test suite meets it: installed with dotmesh, run by pytest
in a subprocess against a store the dm command made."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DM

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # pytest in a subprocess, a store made with dm: seconds each


def _two_states(dm: DM):
    dm.ok("init", "app")
    db = dm.path("app.db")
    (db / "state").write_text("A")
    dm.ok("commit", "-m", "state a")
    dm.ok("tag", "state-a")
    (db / "state").write_text("B")
    (db / "only-b").write_text("b")
    dm.ok("commit", "-m", "state b")
    dm.ok("tag", "state-b")
    (db / "state").write_text("work in progress")  # uncommitted: must be there afterwards
    return db


def test_twenty_tests_pinned_to_two_states_each_see_exactly_theirs(pytester, dm):
    db = _two_states(dm)
    head = json.loads(dm.ok("log", "--json"))[0]["id"]
    tests = [f"import pathlib\nimport pytest\nDB = pathlib.Path({str(db)!r})\n"]
    for i in range(20):  # alternating: each test finds the other state, changed by its test
        if i % 2:
            tests.append(f"""
def test_{i:02}_b(dotmesh_state):
    app = dotmesh_state("app", "state-b")
    assert app.name == "app" and (DB / "state").read_text() == "B"
    assert (DB / "only-b").read_text() == "b"
    (DB / "state").write_text("changed by {i}")
""")
        else:
            tests.append(f"""
@pytest.mark.dotmesh_state("app", "state-a")
def test_{i:02}_a():
    assert (DB / "state").read_text() == "A" and not (DB / "only-b").exists()
    (DB / "left-by-{i}").write_text("x")
""")
    pytester.makepyfile(test_states="".join(tests))
    result = pytester.runpytest_subprocess("--dotmesh-home", str(dm.home), "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=20)
    assert (db / "state").read_text() == "work in progress"
    assert sorted(p.name for p in db.iterdir()) == ["only-b", "state"]
    assert json.loads(dm.ok("log", "--json"))[0]["id"] == head
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


def test_a_failed_tests_state_is_kept_on_a_branch_to_share(pytester, dm):
    db = _two_states(dm)
    pytester.makepyfile(test_fails=f"""
import pathlib
import pytest

@pytest.fixture
def server():
    # A user's fixture that starts the app: it runs once the state is in place.
    assert (pathlib.Path({str(db)!r}) / "state").read_text() == "A"
    yield "running"

@pytest.mark.dotmesh_state("app", "state-a", start="server")
def test_breaks_the_data():
    (pathlib.Path({str(db)!r}) / "state").write_text("broken")
    assert False, "the bug"

@pytest.mark.dotmesh_state("app", "state-b")
def test_passes():
    pass

@pytest.mark.dotmesh_state("app", "no-such-state")
def test_on_a_state_nobody_has():
    pass
""")
    result = pytester.runpytest_subprocess("--dotmesh-home", str(dm.home),
                                           "--dotmesh-keep-failed", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*unknown ref 'no-such-state'*",
                                 "*test_breaks_the_data: dot app, branch "
                                 "failed/test_breaks_the_data*"])
    assert dm.ok("cat", "failed/test_breaks_the_data:db/state") == "broken"
    assert (db / "state").read_text() == "work in progress"
    branches = dm.ok("branch")
    assert "failed/test_passes" not in branches and "no-such-state" not in branches


def test_the_started_fixture_is_torn_down_on_the_state_before_it_goes(pytester, dm):
    """start=: the servers a fixture started stop (and write their last files) inside the
    pinned state; only then does the state before come back."""
    db = _two_states(dm)
    pytester.makepyfile(test_order=f"""
import pathlib
import pytest

DB = pathlib.Path({str(db)!r})

@pytest.fixture
def server():
    assert (DB / "state").read_text() == "A"
    yield
    assert (DB / "state").read_text() == "A", "the state went before the server stopped"
    (DB / "server-log").write_text("stopped")

@pytest.mark.dotmesh_state("app", "state-a", start="server")
def test_runs_the_server():
    pass

def test_from_inside(dotmesh_state):
    dotmesh_state("app", "state-a", start="server")
""")
    result = pytester.runpytest_subprocess("--dotmesh-home", str(dm.home), "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert (db / "state").read_text() == "work in progress" and not (db / "server-log").exists()
