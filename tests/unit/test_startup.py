"""Start-up: the CLI and each short command import only what they use.

Importing is most of a short command's time (``bench/startup.py`` times it), so this pins the
module set, which cannot flake, rather than a time: a fresh interpreter runs the command and
reports ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dotmesh.cli.main import run

# Never needed by the commands below.
REMOTE = ("dotmesh.ops.sync", "dotmesh.ops.remotes", "dotmesh.remote", "dotmesh.server",
          "httpx", "boto3", "botocore", "starlette", "uvicorn", "sqlalchemy", "psycopg",
          "docker", "rich", "tomllib")
# What needs a store: only the commands that open one import it.
STORE = ("dotmesh.ops", "dotmesh.store", "dotmesh.workdir", "dotmesh.capture", "dotmesh.meta",
         "dotmesh.fs", "dotmesh.model.objects", "sqlite3", "zstandard", "blake3", "pyfastcdc",
         "xxhash", "inotify_simple", "concurrent.futures", "ctypes", "subprocess")

_REPORT = """
import json, sys
from dotmesh.cli.main import run
code = run(json.loads(sys.argv[1]))
print("\\n" + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _modules(args: list[str] | None, home: Path) -> set[str]:
    """The modules a fresh interpreter holds after ``dm ARGS`` (None: after importing the CLI)."""
    code = ("import json, sys, dotmesh.cli.main; print(json.dumps({'code': 0, 'modules': "
            "sorted(sys.modules)}))" if args is None else _REPORT)
    env = {**os.environ, "DM_HOME": str(home), "DM_AUTHOR": "tester",
           "DOCKER_HOST": f"unix://{home}/no-docker.sock"}  # no engine: the SDK stays out
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, p.stderr
    return set(report["modules"])


def _loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules (packages, not their submodules) of ``modules`` under ``prefixes``."""
    found = {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}
    return sorted(m for m in found if m.rpartition(".")[0] not in found)


@pytest.mark.parametrize("args", [None, ["--help"], ["--version"], ["hub", "--help"],
                                  ["remote", "--help"],
                                  ["s3", "remote", "add", "--help"], ["push", "--help"],
                                  ["checkout", "--help"], ["fsck", "--help"]],
                         ids=lambda a: "import" if a is None else " ".join(a))
def test_help_and_import_load_no_store(tmp_path: Path, args: list[str] | None) -> None:
    assert _loaded(_modules(args, tmp_path), REMOTE + STORE) == []


def test_hub_commands_load_only_the_hub_config(tmp_path: Path) -> None:
    """The hub's group reads its config before any subcommand, even for --help; the server
    itself (starlette, uvicorn, SQLAlchemy) waits for dm hub serve."""
    config = ("dotmesh.remote", "dotmesh.remote.blobs", "dotmesh.server", "dotmesh.server.hub",
              "dotmesh.server.hub.config")
    loaded = _modules(["hub", "serve", "--help"], tmp_path)
    assert "dotmesh.server.hub.config" in loaded
    assert _loaded(loaded - set(config), REMOTE + STORE) == ["tomllib"]


def test_the_daemons_client_imports_only_built_in_modules() -> None:
    """What every command runs first when a daemon is up (cli/launch.py, then
    server/resident.py): no ``typing``, ``re`` or ``json`` (``typing`` alone took 18 ms of
    a command's 60 through the daemon)."""
    code = ("import sys; before = set(sys.modules); import dotmesh.server.resident; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stderr
    added = set(p.stdout.split())
    ours = {m for m in added if m.startswith("dotmesh")}
    assert ours == {"dotmesh", "dotmesh.version", "dotmesh.server", "dotmesh.server.resident"}
    assert not added & {"typing", "re", "json", "pathlib", "socket", "enum"}, added - ours


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small store: dot app, one subdot, two commits."""
    home = tmp_path_factory.mktemp("startup")
    assert run(["--home", str(home), "init", "app", "--backend", "plain"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run(["--home", str(home), "path", "app.db"]) == 0
    data = Path(out.getvalue().strip())
    for i in range(2):
        (data / "f").write_text(f"state {i}\n")
        assert run(["--home", str(home), "commit", "-m", f"c{i}", "--no-freeze"]) == 0
    return home


# A commit's capture: freezing writers, hooks, inotify.
CAPTURE = ("dotmesh.ops.commit", "dotmesh.ops.hooks", "dotmesh.capture.freeze",
           "dotmesh.capture.hooks", "dotmesh.capture.changes", "inotify_simple")
# Reading and writing folders: the scan (chunker, thread pools) and the restore.
FOLDERS = ("dotmesh.workdir.snapshot", "dotmesh.workdir.restore", "dotmesh.store.chunker",
           "pyfastcdc", "concurrent.futures", "dotmesh.capture")


@pytest.mark.parametrize("args", [["version"], ["log"], ["branch"], ["config"]], ids=" ".join)
def test_reading_commands_load_no_folder_code(store: Path, args: list[str]) -> None:
    assert _loaded(_modules(args, store), REMOTE + CAPTURE + FOLDERS) == []


@pytest.mark.parametrize("args", [["list"], ["checkout", "-b", "x"], ["reset", "--hard", "HEAD^"]],
                         ids=" ".join)
def test_local_commands_load_no_remote_or_capture_code(store: Path, args: list[str]) -> None:
    assert _loaded(_modules(args, store), REMOTE + CAPTURE + ("dotmesh.ops.fsck",)) == []
