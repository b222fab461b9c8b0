"""Every example in a command's --help parses: the words after ``dm`` name a command that
exists, with arguments and options it takes (an example that fails as typed teaches the
wrong thing). Nothing is run: click only parses each one."""

from __future__ import annotations

import re
import shlex

import click
import pytest

from dotmesh.cli.main import cli


def commands(group: click.Group = cli, path: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    for name, cmd in group.commands.items():
        out.append(((*path, name), cmd))
        if isinstance(cmd, click.Group):
            out.extend(commands(cmd, (*path, name)))
    return out


def examples(cmd: click.Command) -> list[str]:
    """The dm command lines of the help's Example block (one per line, shell joins split)."""
    text = cmd.help or ""
    block = text.split("Example:", 1)[1] if "Example:" in text else ""
    lines = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()  # a comment after the command
        if not line:
            continue
        inner = re.findall(r"\$\((dm [^)]*)\)", line)  # "$(dm path app)" in another command
        for part in [*re.split(r"&&|;|\||&", re.sub(r"\$\([^)]*\)", "X", line)), *inner]:
            words = shlex.split(part)
            if ">" in words:  # a redirection: the shell's, not dm's
                words = words[:words.index(">")]
            while words and (re.fullmatch(r"[A-Z0-9_]+=\S*", words[0]) or words[0] == "sudo"):
                words.pop(0)  # VAR=value dm ..., sudo dm ...
            if words and words[0] == "dm":
                lines.append(words[1:])
    return lines


ALL = [(" ".join(path), cmd) for path, cmd in commands()]


def test_every_command_has_an_example() -> None:
    missing = [name for name, cmd in ALL
               if not isinstance(cmd, click.Group) and not examples(cmd) and not cmd.hidden]
    assert missing == [], missing


@pytest.mark.parametrize("name,cmd", ALL, ids=[n for n, _ in ALL])
def test_each_example_parses(name: str, cmd: click.Command) -> None:
    for words in examples(cmd):
        target: click.Command = cli
        ctx = cli.make_context("dm", [], resilient_parsing=True)
        rest = list(words)
        while rest and isinstance(target, click.Group):
            options = []
            while rest and rest[0].startswith("-"):  # options of the group itself
                options.append(rest.pop(0))
                if rest and not rest[0].startswith("-") and options[-1] in ("--home",):
                    options.append(rest.pop(0))
            sub = target.get_command(ctx, rest[0]) if rest else None
            if sub is None:
                break
            rest.pop(0)
            target = sub
        assert not isinstance(target, click.Group) or target.invoke_without_command, (
            name, words)
        try:
            target.make_context(" ".join(words), rest, parent=ctx)
        except click.BadParameter as e:  # a file the example names that is not here
            assert "does not exist" in e.format_message(), (words, e.format_message())
        except click.UsageError as e:
            raise AssertionError(f"dm {' '.join(words)}: {e.format_message()}") from None
