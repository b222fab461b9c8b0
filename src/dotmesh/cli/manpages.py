"""``dm help``: a command's help, or with ``--man DIR`` a man page per command (``dm.1``,
``dm-commit.1``, ``dm-hub-user-add.1``...) made from the same help text, so they never
drift apart. scripts/setup.sh writes them into the virtualenv's ``share/man/man1``."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import click

from dotmesh.errors import UsageError
from dotmesh.version import __version__


def _escape(text: str) -> str:
    """Text as troff shows it: backslashes and dashes literal, no line read as a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in out.split("\n"))


def _paragraphs(text: str) -> list[str]:
    """Help text as troff: paragraphs filled, click's \\b blocks kept as written."""
    out = []
    for block in inspect.cleandoc(click.unstyle(text)).split("\n\n"):
        if block.startswith("\b\n"):
            out.append(".PP\n.nf\n" + _escape(block[2:]) + "\n.fi")
        else:
            out.append(".PP\n" + _escape(" ".join(block.split())))
    return out


def _commands(cmd: click.Command, path: tuple[str, ...]
              ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _commands(cmd.commands[name], (*path, name))


def page(cmd: click.Command, path: tuple[str, ...], ctx: click.Context) -> str:
    """The man page of the command at ``path`` (``("dm", "commit")``)."""
    name = "-".join(path)
    lines = [f'.TH "{name.upper()}" "1" "" "dm {__version__}" "dotmesh manual"',
             ".SH NAME", f"{_escape(name)} \\- {_escape(cmd.get_short_help_str(200))}",
             ".SH SYNOPSIS", f".B {_escape(' '.join(path))}",
             _escape(" ".join(cmd.collect_usage_pieces(ctx)))]
    if cmd.help:
        lines += [".SH DESCRIPTION", *_paragraphs(cmd.help)]
    options = [r for p in cmd.get_params(ctx) if (r := p.get_help_record(ctx))]
    if options:
        lines.append(".SH OPTIONS")
        for decls, text in options:
            lines += [".TP", f"\\fB{_escape(decls)}\\fR", _escape(" ".join(text.split()))]
    if isinstance(cmd, click.Group) and cmd.commands:
        lines.append(".SH COMMANDS")
        for sub in sorted(cmd.commands):
            lines += [".TP", f"\\fB{_escape(sub)}\\fR",
                      _escape(cmd.commands[sub].get_short_help_str(200)),
                      f"See \\fB{_escape('-'.join((*path, sub)))}\\fR(1)."]
    if len(path) > 1:
        lines += [".SH SEE ALSO", f"\\fB{_escape('-'.join(path[:-1]))}\\fR(1)"]
    return "\n".join(lines) + "\n"


def write_pages(root: click.Command, folder: Path) -> list[Path]:
    """A page for ``root`` and every command beneath it, in ``folder`` (made if need be)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, cmd in _commands(root, ("dm",)):
        with click.Context(cmd, info_name=" ".join(path)) as ctx:
            target = folder / f"{'-'.join(path)}.1"
            target.write_text(page(cmd, path, ctx))
            written.append(target)
    return written


@click.command("help")
@click.argument("command", nargs=-1)
@click.option("--man", "man_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, metavar="DIR",
              help="Write a man page per command into DIR (dm.1, dm-commit.1, ...).")
@click.pass_context
def help_(ctx: click.Context, command: tuple[str, ...], man_dir: Path | None) -> None:
    """Show a command's help (dm help COMMAND is dm COMMAND --help), or write the man pages.

    \b
    Example:  dm help commit
              dm help --man ~/.local/share/man/man1 && man dm-commit
    """
    root = ctx.find_root().command
    if man_dir is not None:
        if command:
            raise UsageError("--man writes every page: give no COMMAND")
        written = write_pages(root, man_dir)
        click.echo(f"Wrote {len(written)} man pages to {man_dir}")
        return
    cmd, path = root, ["dm"]
    for word in command:
        sub = cmd.commands.get(word) if isinstance(cmd, click.Group) else None
        if sub is None:
            raise UsageError(f"no command {' '.join([*path, word])!r}: see dm --help")
        cmd, path = sub, [*path, word]
    with click.Context(cmd, info_name=" ".join(path)) as sub_ctx:
        click.echo(cmd.get_help(sub_ctx))


def register(cli: click.Group) -> None:
    cli.add_command(help_)


__all__ = ["page", "register", "write_pages"]
