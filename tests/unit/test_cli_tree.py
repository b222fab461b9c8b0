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
    "completion": "prints a shell script",
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

    assert dm("init", "app") == {"dot": "app", "current": True}
    assert dm("init", "other") == {"dot": "other", "current": False}
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
