"""The example of docs/python.md, run as its reader would: real PostgreSQL and Redis on a
dot's folders, ``capture_bug.py`` while they serve, then ``test_regression.py`` under pytest
with the dotmesh plugin, pinned to the captured state."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dotmesh import Repo
from tests.conftest import capture
from tests.integration.servers import PG_BIN, shared_tmp

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_example_mobycounter", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # PostgreSQL starts three times
def test_the_python_page_example_captures_bug_42_and_its_regression_test_passes_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with shared_tmp() as top:
        project = top / "project"  # the reader's project: the example's files, nothing else
        shutil.copytree(EXAMPLES, project, ignore=shutil.ignore_patterns("__pycache__"))
        env = {"DM_HOME": str(top / "home"), "APP_SOCKETS": str(top / "sockets"),
               "APP_PG_BIN": PG_BIN[-1], "DM_AUTHOR": "tester"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        app_module = _load(project / "mobycounter.py")
        with Repo.open() as repo:
            os.chmod(repo.home, 0o711)  # the postgres user reaches its data directory
            dot = app_module.create(repo)
            with app_module.servers(dot) as app:
                for email in ("ann@example.com", "cy@example.com"):
                    app_module.signup(app, email)
                two = dot.commit("two users").id
                bob = app_module.signup(app, " Bob@Example.COM")  # what bug 42 stores
                capture_bug = subprocess.run(
                    [sys.executable, "capture_bug.py"], cwd=project, capture_output=True,
                    text=True, timeout=300, stdin=subprocess.DEVNULL)
                assert capture_bug.returncode == 0, capture_bug.stderr
                assert capture_bug.stdout.startswith("bug-42 is "), capture_bug.stdout
                app_module.click(app, bob)  # the app goes on after the capture
                app_module.signup(app, "dee@example.com")
            later = dot.commit("four users").id
            (dot.path("uploads") / "logo.png").write_bytes(b"not committed yet")
            before = {s: capture(dot.path(s)) for s in dot.subdots()}

            tagged = dot.tags()["bug-42"]
            shown = dot.show("bug-42").commit
            assert shown.metadata["ticket"] == "BUG-42" and "Bob" in shown.metadata["emails"]
            assert shown.parents == (two,) and tagged.commit == dot.resolve("HEAD^")
            assert float(shown.metadata["dm.freeze_ms"]) > 0  # captured live: frozen for a moment

            tests = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                 "--dotmesh-home", str(repo.home), "test_regression.py"],
                cwd=project, capture_output=True, text=True, timeout=300,
                stdin=subprocess.DEVNULL)
            assert tests.returncode == 0, tests.stdout + tests.stderr
            assert "1 passed" in tests.stdout, tests.stdout

            # Exactly the state before is back: head, branch, every file of every subdot.
            assert dot.branch == "master" and dot.head == later
            assert {s: capture(dot.path(s)) for s in dot.subdots()} == before
            assert dot.tags()["bug-42"] == tagged
            log = (top / "sockets" / "postgres.log").read_text()
            assert "smart shutdown" not in log  # the test's servers stopped before dm moved
