"""The output options every command takes: ``--quiet`` and ``--progress=auto|json|none``.

They are the group's options (``dm --quiet commit ...``) and, so that they may be written where
people write them, every command's too (``dm commit -m x --progress=json``): :func:`install`
adds them to the whole tree. They set :class:`dotmesh.cli.render.Output`, which
``progress_bar`` and ``info`` read.
"""

from __future__ import annotations

from typing import TypeVar

import click

from dotmesh.cli.render import Output

G = TypeVar("G", bound=click.Command)

PROGRESS_CHOICES = ("auto", "json", "none")
QUIET_HELP = "No progress, and no informational lines: only results and errors."
PROGRESS_HELP = ("Progress of long operations on stderr: auto (a bar on a terminal, nothing "
                 "otherwise), json (one JSON line per update: label, done, total, rate, eta), "
                 "none.")


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        Output.quiet = True


def _set_progress(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        Output.progress = value


def _group_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    Output.reset()  # each command starts from the defaults (an in-process runner, the daemon)
    Output.quiet = value


def group_options(f: G) -> G:
    """The group's --quiet and --progress (the group parses first: it resets the state)."""
    f.params[:0] = [
        click.Option(["--quiet", "-q", "output_quiet"], is_flag=True, expose_value=False,
                     is_eager=True, callback=_group_quiet, help=QUIET_HELP),
        click.Option(["--progress", "output_progress"], type=click.Choice(PROGRESS_CHOICES),
                     default=None, expose_value=False, callback=_set_progress,
                     help=PROGRESS_HELP)]
    return f


def _command_options(cmd: click.Command) -> list[click.Parameter]:
    taken = {o for p in cmd.params for o in getattr(p, "opts", [])} | {p.name for p in cmd.params}
    extra: list[click.Parameter] = []
    if "--quiet" not in taken and "quiet" not in taken:
        short = ["-q"] if "-q" not in taken else []
        extra.append(click.Option(["--quiet", "output_quiet", *short], is_flag=True,
                                  expose_value=False, callback=_set_quiet, help=QUIET_HELP))
    if "--progress" not in taken:
        extra.append(click.Option(["--progress", "output_progress"],
                                  type=click.Choice(PROGRESS_CHOICES), default=None,
                                  expose_value=False, callback=_set_progress,
                                  help=PROGRESS_HELP))
    return extra


def install(group: click.Group) -> None:
    """Give every command under ``group`` --quiet and --progress (those a command already has
    with another meaning, such as dm serve --quiet, stay its own)."""
    for cmd in group.commands.values():
        cmd.params.extend(_command_options(cmd))
        if isinstance(cmd, click.Group):
            install(cmd)
