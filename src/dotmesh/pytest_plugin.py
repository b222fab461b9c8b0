"""A pytest plugin (loaded by pytest wherever dotmesh is installed): run a test on a named
state of a dot, and put back afterwards exactly the state that was there.

```python
@pytest.mark.dotmesh_state("app", "bug-42")
def test_the_broken_user_can_log_in(app_server):
    ...

def test_two_states(dotmesh_state):
    app = dotmesh_state("app", "empty-db")     # the same, from inside a test
```

The state is restored before the test's other fixtures run, so a fixture that starts the
app's servers sees it (or name one: ``dotmesh_state("app", "bug-42", start="servers")``);
processes using the dot are stopped first and containers restarted, as
``dm reset --stop-writers`` does. Options: ``--dotmesh-home`` (the store; default
``$DM_HOME``, else dm's default), ``--dotmesh-remote`` (where missing states are fetched
from; default: the dot's remote), ``--dotmesh-keep-failed`` (a failing test's state is
committed on the branch ``failed/TEST`` before it goes, to share with ``dm push``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # dotmesh's own code is imported when a test asks for a state
    from dotmesh.api import Dot, Repo

MARKER = "dotmesh_state"
_KEPT = pytest.StashKey[list[tuple[str, str, str]]]()
_OUTCOME = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dotmesh", "run tests on named states of dots")
    group.addoption("--dotmesh-home", default=None, metavar="DIR",
                    help="the dotmesh store (default: $DM_HOME, else dm's default store)")
    group.addoption("--dotmesh-remote", default=None, metavar="REMOTE",
                    help="fetch states that are not in the store from this remote (default: "
                         "the dot's remote)")
    group.addoption("--dotmesh-keep-failed", action="store_true",
                    help="commit a failing test's state on the branch failed/TEST")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(dot, ref, stop_writers=True, start=None): run the test on the "
                   "state REF (a tag, branch or commit) of DOT, then put back the state that "
                   "was there; start: a fixture to set up once the state is in place")
    config.stash[_KEPT] = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Remember each phase's report: a state is kept only if its test failed."""
    report = yield
    item.stash.setdefault(_OUTCOME, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def dotmesh_repo(pytestconfig: pytest.Config) -> Iterator[Repo]:
    """The store the tests' states come from (``--dotmesh-home``)."""
    from dotmesh.api import Repo  # noqa: PLC0415

    with Repo.open(pytestconfig.getoption("dotmesh_home")) as repo:
        yield repo


@pytest.fixture
def dotmesh_state(request: pytest.FixtureRequest) -> Iterator[Callable[..., Dot]]:
    """``dotmesh_state(dot, ref, stop_writers=True, start=None)``: the dot at state ``ref``
    for the rest of the test, the state before put back after it. Returns the dot."""
    with ExitStack() as stack:
        def enter(dot: str, ref: str, stop_writers: bool = True,
                  start: str | None = None) -> Dot:
            return _enter(request, stack, dot, ref, stop_writers, start)
        yield enter


@pytest.fixture(autouse=True)
def _dotmesh_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """What ``@pytest.mark.dotmesh_state`` does (before the test's other fixtures)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        yield
        return
    with ExitStack() as stack:
        _enter(request, stack, *marker.args, **marker.kwargs)
        yield


def _enter(request: pytest.FixtureRequest, stack: ExitStack, dot: str, ref: str,
           stop_writers: bool = True, start: str | None = None) -> Dot:
    from dotmesh.errors import NotFound  # noqa: PLC0415

    repo: Repo = request.getfixturevalue("dotmesh_repo")
    target = repo.dot(dot)
    remote = request.config.getoption("dotmesh_remote")
    if remote is not None:  # a state not here comes from the remote named
        try:
            target.resolve(ref)
        except NotFound:
            target.fetch(ref, remote)
    visit = stack.enter_context(target.at(ref, stop_writers=stop_writers))
    stack.callback(_keep_if_failed, request, target, visit)
    if start is not None:
        # pytest tears a test's fixtures down last-in first-out, and one asked for from
        # here is registered after this one: the state's exit moves to a finalizer
        # registered before it, so that the started servers stop before the state goes.
        request.node.addfinalizer(stack.pop_all().close)
        request.getfixturevalue(start)
    return target


def _keep_if_failed(request: pytest.FixtureRequest, dot: Dot, visit: Any) -> None:
    """At teardown, inside the state: commit it on failed/TEST if the test failed."""
    if not request.config.getoption("dotmesh_keep_failed"):
        return
    reports = request.node.stash.get(_OUTCOME, {})
    if not any(r.failed for r in reports.values()):
        return
    branch = _free_branch(dot, "failed/" + _branch_part(request.node.name))
    dot.keep(visit, branch, f"the state {request.node.nodeid} failed on")
    request.config.stash[_KEPT].append((request.node.nodeid, dot.name, branch))


def _branch_part(name: str) -> str:
    part = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "test"
    return part[:50]


def _free_branch(dot: Dot, wanted: str) -> str:
    taken = set(dot.branches())
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = f"{wanted}-{n}"
    return name


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("dotmesh: states of failed tests")
        for nodeid, dot, branch in kept:
            terminalreporter.line(f"{nodeid}: dot {dot}, branch {branch} "
                                  f"(dm push --branch {branch} shares it)")
