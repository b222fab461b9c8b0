"""Output people and scripts rely on: progress as JSON lines, --quiet, hook output, what a
first commit says, the demo's closing hint."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DM_BIN

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_progress_json_quiet_hooks_and_a_first_commit(dm):
    dm.ok("init", "app")
    folder = dm.path("app.files")
    (folder / "big.bin").write_bytes(os.urandom(1_500_000))
    (folder / "small.txt").write_text("hello")
    dm.ok("hook", "add", "pre-freeze", "echo checkpointing; echo done >&2")
    p = dm("commit", "-m", "first", "--progress=json", check=True)
    assert "read 2 files (" in p.stdout  # a first commit reads everything: not "changed"
    err = p.stderr.splitlines()
    hooks = [x for x in err if x.startswith("hook #")]
    assert hooks == ["hook #1 (pre-freeze): checkpointing", "hook #1 (pre-freeze): done"]
    lines = [json.loads(x) for x in err if x not in hooks]  # not a terminal: no bar
    assert lines and all(x["label"] == "Committing" for x in lines)
    assert {"label", "done", "total", "rate", "eta"} <= set(lines[0])
    last = lines[-1]
    assert last["final"] and last["done"] == last["total"] == 1_500_005
    assert last["eta"] == 0 and last["rate"] > 0

    (folder / "small.txt").write_text("changed")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    p = dm("--quiet", "commit", "-m", "second", "--progress=json", check=True)
    assert "hook #1" in p.stderr and "Committing" not in p.stderr  # hooks still speak
    assert p.stdout.count("\n") == 1 and "second" in p.stdout  # the result line alone
    p = dm("commit", "-m", "third", check=True)
    assert "read 0 changed files" in p.stdout and "Committing" not in p.stderr


def test_hook_output_is_shown_as_it_is_written(dm, tmp_path):
    """A slow hook's first line is on stderr while the hook still runs, not at its end."""
    dm.ok("init", "app")
    (dm.path("app") / "f").write_text("x")
    flag = tmp_path / "go-on"
    dm.ok("hook", "add", "pre-freeze", f"echo waiting; until [ -e {flag} ]; do sleep 0.02; "
          "done; echo went on")
    p = dm.popen("commit", "-m", "with a slow hook")
    try:
        assert p.stderr is not None
        first = p.stderr.readline()  # blocks until the hook's first line: the flag is not there
        assert first == "hook #1 (pre-freeze): waiting\n"
        flag.touch()
        out, err = p.communicate(timeout=60)
    finally:
        flag.touch()
        p.kill() if p.poll() is None else None
    assert p.returncode == 0, err
    assert "hook #1 (pre-freeze): went on" in err and "with a slow hook" in out


def test_the_demo_s_closing_hint_works_as_printed(dm, tmp_path):
    dm.ok("init", "app")
    closing = [line for line in (REPO / "scripts/demo.sh").read_text().splitlines()
               if "Explore it with" in line]
    assert len(closing) == 1
    env = {"PATH": "/usr/bin:/bin", "DM_HOME": str(dm.home), "HOME": str(tmp_path)}
    hint = subprocess.run(["bash", "-c", closing[0]], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    command = hint.split("Explore it with: ", 1)[1]
    assert Path(DM_BIN).resolve() == Path(command.split()[1]).resolve()
    p = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert "No commits yet" in p.stdout


@pytest.mark.slow
def test_shell_completion(dm):
    p = dm("completion", "bash", check=True)
    assert "_DM_COMPLETE=bash_complete" in p.stdout and "complete " in p.stdout
    assert "dm" in p.stdout.split("complete ")[-1]
    for shell in ("zsh", "fish"):
        assert "_DM_COMPLETE" in dm.ok("completion", shell)
    dm.ok("init", "app")
    dm.ok("commit", "-m", "one")
    dm.ok("checkout", "-b", "experiment")
    dm.ok("tag", "v1")

    def complete(line: str) -> list[str]:
        words = line.split()
        env = {**dm.env, "_DM_COMPLETE": "bash_complete", "COMP_WORDS": line,
               "COMP_CWORD": str(len(words) if line.endswith(" ") else len(words) - 1)}
        p = subprocess.run([DM_BIN], env=env, capture_output=True, text=True, check=True)
        return [x.split(",", 1)[1] for x in p.stdout.splitlines() if x]

    assert complete("dm checkout ") == ["experiment", "master"]
    assert complete("dm log ") == ["HEAD", "HEAD^", "experiment", "master", "v1"]
    assert complete("dm swi") == ["switch"]
    assert complete("dm --home /nonexistent/x checkout ") == []  # no store: nothing, no error
