"""``dm completion bash|zsh|fish``: shell completion of commands, options, dots, branches,
tags, remotes and refs.

Click does the protocol (the script calls ``dm`` again with ``_DM_COMPLETE`` set; ``dm``, run
by the resident daemon or not, answers and exits); this module prints the script and gives
the arguments that name things in the store their completers. The completers are attached
to the finished command tree by :func:`install`, by command path and parameter name, so the
command modules stay as they are. A completer reads the store only if it exists (it never
makes one), and any failure means no suggestions, never an error on the user's prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.shell_completion import CompletionItem, get_completion_class

from dotmesh.errors import UsageError

if TYPE_CHECKING:
    from dotmesh.store.repo import Repo

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_DM_COMPLETE"

Names = Callable[["Repo", click.Context], list[str]]


@contextmanager
def _store(ctx: click.Context) -> Iterator[Repo | None]:
    """The store --home or $DM_HOME names, if there is one (completion makes nothing)."""
    home = ctx.find_root().params.get("home")
    if home is None:
        from dotmesh.store.repo import default_home

        home = default_home()
    if not (Path(home) / "meta.db").is_file():
        yield None
        return
    from dotmesh.store.repo import Repo

    repo = Repo(Path(home))
    try:
        yield repo
    finally:
        repo.close()


def _dot(repo: Repo, ctx: click.Context) -> str | None:
    """The dot a command acts on: its DOT argument if given and known, else the current."""
    for key in ("dot", "name", "dot_name"):
        given = ctx.params.get(key)
        if isinstance(given, str) and given in repo.dots():
            return given
    return repo.current_dot()


def _dots(repo: Repo, ctx: click.Context) -> list[str]:
    return repo.dots()


def _volumes(repo: Repo, ctx: click.Context) -> list[str]:
    return [*repo.dots(), *(f"{d}.{s}" for d in repo.dots() for s in repo.subdots(d))]


def _branches(repo: Repo, ctx: click.Context) -> list[str]:
    dot = _dot(repo, ctx)
    return list(repo.branches(dot)) if dot else []


def _tags(repo: Repo, ctx: click.Context) -> list[str]:
    dot = _dot(repo, ctx)
    return list(repo.tags(dot)) if dot else []


def _refs(repo: Repo, ctx: click.Context) -> list[str]:
    return ["HEAD", "HEAD^", *_branches(repo, ctx), *_tags(repo, ctx)]


def _remotes(repo: Repo, ctx: click.Context) -> list[str]:
    from dotmesh.ops import remotes

    return [r.name for r in remotes.all_remotes(repo)]


def _completer(names: Names, subdots_after_colon: bool = False
               ) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    def complete(ctx: click.Context, param: click.Parameter,
                 incomplete: str) -> list[CompletionItem]:
        try:
            with _store(ctx) as repo:
                if repo is None:
                    return []
                if subdots_after_colon and ":" in incomplete:  # REF:SUBDOT[/PATH]
                    ref = incomplete.partition(":")[0]
                    dot = _dot(repo, ctx)
                    found = [f"{ref}:{s}/" for s in (repo.subdots(dot) if dot else [])]
                else:
                    found = names(repo, ctx)
            return [CompletionItem(n) for n in dict.fromkeys(found) if n.startswith(incomplete)]
        except Exception:  # noqa: BLE001 - a completion must never fail on the prompt
            return []
    return complete


# (command path, parameter name) -> what it names
COMPLETERS: dict[tuple[str, str], Names] = {
    ("switch", "dot"): _dots,
    ("path", "name"): _volumes,
    ("dot show", "name"): _dots,
    ("dot delete", "name"): _dots,
    ("subdot list", "dot_name"): _dots,
    ("subdot set-kind", "volume"): _volumes,
    ("du", "dots"): _dots,
    ("checkout", "branch_name"): _branches,
    ("checkout", "start"): _refs,
    ("branch", "delete"): _branches,
    ("branch", "force_delete"): _branches,
    ("log", "ref"): _refs,
    ("reset", "ref"): _refs,
    ("diff", "refs"): _refs,
    ("show", "ref"): _refs,
    ("export", "ref"): _refs,
    ("mount", "ref"): _refs,
    ("tag", "name"): _tags,
    ("tag", "ref"): _refs,
    ("push", "remote_name"): _remotes,
    ("push", "dot"): _dots,
    ("push", "branch"): _branches,
    ("pull", "remote_name"): _remotes,
    ("pull", "dot"): _dots,
    ("pull", "branch"): _branches,
    ("clone", "remote_name"): _remotes,
    ("remote rm", "name"): _remotes,
    ("remote switch", "name"): _remotes,
}
# REF[:SUBDOT[/PATH]]: refs, then the subdots after the colon
WHERE = {("ls", "where"), ("cat", "where")}


def install(cli: click.Group) -> None:
    """Give the arguments and options that name dots, branches, tags, remotes and refs
    their completers (the command tree must be complete)."""
    for (path, param_name), names in [*COMPLETERS.items(), *((w, _refs) for w in WHERE)]:
        cmd: click.Command = cli
        for part in path.split():
            assert isinstance(cmd, click.Group), path
            cmd = cmd.commands[part]
        [param] = [p for p in cmd.params if p.name == param_name]
        param._custom_shell_complete = _completer(names, (path, param_name) in WHERE)


def script(cli: click.Command, shell: str, prog: str = "dm") -> str:
    cls = get_completion_class(shell)
    if cls is None:
        raise UsageError(f"no completion for {shell!r}: use one of {', '.join(SHELLS)}")
    return cls(cli, {}, prog, COMPLETE_VAR).source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS), metavar="SHELL")
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell code that completes dm's commands, options, dots, branches, tags,
    remotes and refs. Load it from your shell's start-up file.

    \b
    Example:  dm completion bash > ~/.local/share/bash-completion/completions/dm
              echo 'eval "$(dm completion zsh)"' >> ~/.zshrc
              dm completion fish > ~/.config/fish/completions/dm.fish
    """
    click.echo(script(ctx.find_root().command, shell), nl=False)


def register(cli: click.Group) -> None:
    cli.add_command(completion)


__all__ = ["COMPLETE_VAR", "install", "register", "script"]
