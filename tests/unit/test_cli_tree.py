"""Every command a script may read has --json; the new --json forms print one JSON value."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from dotmesh.cli.main import cli, run

# Commands without --json, and why: their output is not something to parse.
NO_JSON = {
    "cat": "writes a file's bytes to stdout",
    "serve": "a server: runs until stopped, logs requests",
    "hub serve": "a server: runs until stopped",
    "ui": "a server: the web UI, runs until stopped",
    "completion": "prints a shell script",
    "help": "prints help, or writes man pages",
}


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def _has_json(cmd: click.Command) -> bool:
    return any("--json" in getattr(p, "opts", ()) for p in cmd.params)


def test_every_command_has_json_or_a_reason_not_to() -> None:
    lacking = []
    for path, cmd in _commands(cli):
        if isinstance(cmd, click.Group) and not cmd.invoke_without_command:
            continue  # only lists its subcommands
        if not _has_json(cmd) and " ".join(path) not in NO_JSON:
            lacking.append(" ".join(path))
    assert lacking == [], f"add --json to these (or a reason to NO_JSON): {lacking}"
    names = {" ".join(p) for p, _ in _commands(cli)}
    assert set(NO_JSON) <= names, "NO_JSON names a command that is gone"


def test_the_new_json_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "h")

    def dm(*args: str) -> object:
        assert run(["--home", home, *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert dm("init") == {"store": home, "made": True, "dot": None, "backend": None}
    assert dm("init", "app") == {"dot": "app", "current": True, "store": home, "made": False}
    assert dm("init", "other") == {"dot": "other", "current": False, "store": home,
                                   "made": False}
    assert dm("switch", "app") == {"current": "app"}
    assert dm("path", "app.db")["path"].endswith("db")  # type: ignore[index]
    assert dm("subdot", "set-kind", "app.db", "files") == {"dot": "app", "subdot": "db",
                                                           "kind": "files"}
    hook = dm("hook", "add", "pre-freeze", "true")
    assert hook["id"] == 1 and hook["stage"] == "pre-freeze"  # type: ignore[index]
    assert dm("hook", "rm", "1") == {"removed": 1}
    dm("commit", "-m", "one")
    made = dm("checkout", "-b", "exp")
    assert made["branch"] == "exp" and made["created"] and made["moved"]  # type: ignore[index]
    assert dm("checkout", "master")["moved"] is True  # type: ignore[index]
    assert dm("branch", "-d", "exp")["deleted"] == "exp"  # type: ignore[index]
    assert dm("dot", "delete", "-f", "other") == {"deleted": "other", "stopped": [],
                                                  "restarted": []}


def test_man_pages_are_made_from_the_help(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import subprocess

    assert run(["help", "--man", str(tmp_path / "man1")]) == 0
    pages = {p.name: p.read_text() for p in (tmp_path / "man1").iterdir()}
    assert {"dm.1", "dm-commit.1", "dm-hub-user-add.1"} <= set(pages)
    assert len(pages) == sum(1 for _ in _commands(cli)) + 1  # every command, and dm itself
    commit = pages["dm-commit.1"]
    assert commit.startswith('.TH "DM-COMMIT" "1"') and "\\-\\-freeze\\-timeout" in commit
    if shutil.which("man"):
        p = subprocess.run(["man", "--warnings", "-l", str(tmp_path / "man1" / "dm-commit.1")],
                           capture_output=True, text=True, env={"MANWIDTH": "80",
                                                                "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert "dm commit -m" in p.stdout and "--freeze-timeout SECONDS" in p.stdout
    capsys.readouterr()
    assert run(["help", "commit"]) == 0
    assert capsys.readouterr().out.startswith("Usage: dm commit [OPTIONS]")
    assert run(["help", "nope"]) == 2


def test_serve_documents_a_second_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from dotmesh.capture.containers import driver

    assert run(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--socket" in text and "DM_DRIVER=dmtest" in text and "driver: dmtest" in text
    unit = tmp_path / "dmtest.service"
    sock = tmp_path / "dmtest.sock"
    assert run(["--home", str(tmp_path / "h"), "serve", "--install", "--socket", str(sock),
                "--unit-path", str(unit)]) == 0
    written = unit.read_text()
    assert f"--socket {sock}" in written and "Environment=DM_DRIVER=dmtest" in written
    assert driver() == "dm"
    monkeypatch.setenv("DM_DRIVER", "dmtest")
    assert driver() == "dmtest"
