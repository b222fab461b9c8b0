"""``dm``: git for application state. Every error ends here as one line and an exit code."""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli import browse as cli_browse
from dotmesh.cli import completion as cli_completion
from dotmesh.cli import daemon as cli_daemon
from dotmesh.cli import hub as cli_hub
from dotmesh.cli import manpages as cli_manpages
from dotmesh.cli import output as cli_output
from dotmesh.cli import remote as cli_remote
from dotmesh.cli import space as cli_space
from dotmesh.cli import tag as cli_tag
from dotmesh.cli import ui as cli_ui
from dotmesh.cli.context import Ctx, json_flag, pass_ctx
from dotmesh.cli.render import (
    commit_header,
    emit_json,
    first_line,
    grouped_writers,
    human_size,
    info,
    iso,
    progress_bar,
    safe,
    table,
    when,
)
from dotmesh.errors import (
    Corrupt,
    DamagedIndex,
    DotmeshError,
    InternalError,
    Interrupted,
    OutOfSpace,
    UsageError,
)
from dotmesh.heap import one_shot
from dotmesh.model.names import VolumeName
from dotmesh.version import FORMAT_VERSION, __version__

if TYPE_CHECKING:
    from dotmesh.capture.stop import Stopped
    from dotmesh.fs.pool import PoolInfo
    from dotmesh.ops import dots as dot_ops

# Every command works through the Python API (dotmesh/api.py, reached as c.repo and c.dot()),
# which imports the ops modules (and the store, capture, the folder backends) inside each call,
# so a command loads only what it runs: start-up is most of a short command's time.
# tests/unit/test_startup.py keeps it so; tests/unit/test_cli_thin.py keeps ops out of here.

DEFAULT_SOCKET = Path("/run/docker/plugins/dm.sock")

_ctx: Ctx | None = None  # for messages about the store's index


def _home_path() -> Path | None:
    return _ctx.path if _ctx is not None else None


@cli_output.group_options
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="The store to use (default: $DM_HOME, else /var/lib/dotmesh for root, "
                   "~/.dotmesh for others).")
@click.version_option(__version__, prog_name="dm")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """dotmesh: commit, branch, reset and share the state of your app's data.

    \b
    Example:
      dm init app && dm path app.clicks-db
      dm commit -m "clean state" && dm log
    """
    global _ctx
    ctx.obj = _ctx = Ctx(home)
    ctx.call_on_close(ctx.obj.close)


# ------------------------------------------------------------------ dots


@cli.command()
@click.argument("dot", required=False)
@click.option("--backend", type=click.Choice(["plain", "btrfs", "reflink"]), default=None,
              help="How the store keeps folders (only before its first dot). Default: btrfs "
                   "subvolumes (snapshots in milliseconds) where the store is on btrfs, "
                   "reflinked copies on XFS made with reflink=1, else plain folders.")
@json_flag
@pass_ctx
def init(c: Ctx, dot: str | None, backend: str | None, as_json: bool) -> None:
    """Create a dot (made current if there is none), in a store made first if there is none.

    dm init is the one command that makes a store: the others, given a --home or DM_HOME
    where there is none (a typo), say so and make nothing. With no DOT it makes only the
    store (for dm serve, dm remote add, dm clone or dm pool create to use).

    \b
    Example:  dm init app
              dm init app --backend plain --json
              dm init && dm remote add hub alice@hub.example.com && dm clone hub app
    """
    from dotmesh.cli.context import is_store

    existed = is_store(c.path)
    repo = c.repo
    if dot is None:
        chosen = repo.choose_backend(backend) if backend else None
        if as_json:
            emit_json({"store": str(c.path.absolute()), "made": not existed, "dot": None,
                       "backend": chosen})
            return
        click.echo(f"{'Made a' if not existed else 'A'} dotmesh store at {c.path.absolute()}"
                   + (" (already there)" if existed else "")
                   + (f", {chosen} backend" if chosen else "")
                   + "; dm init DOT makes a dot in it")
        return
    made = repo.init(dot, backend)
    current = repo.current()
    made_current = current is not None and current.name == made.name
    if as_json:
        emit_json({"dot": dot, "current": made_current, "store": str(c.path.absolute()),
                   "made": not existed})
        return
    click.echo(f"Created dot {dot}" + (" (now the current dot)" if made_current else ""))


@cli.command()
@click.argument("dot")
@json_flag
@pass_ctx
def switch(c: Ctx, dot: str, as_json: bool) -> None:
    """Make DOT the current dot, which commit, log, checkout and reset act on.

    \b
    Example:  dm switch app
    """
    c.repo.switch(dot)
    if as_json:
        emit_json({"current": dot})
        return
    click.echo(f"Current dot is now {dot}")


@cli.command()
@click.argument("name", metavar="DOT[.SUBDOT]")
@click.option("--owner", default=None, metavar="USER[:GROUP]",
              help="Give the folder to this user (root only for another user), e.g. the "
                   "postgres service user; fails if that user cannot reach it.")
@json_flag
@pass_ctx
def path(c: Ctx, name: str, owner: str | None, as_json: bool) -> None:
    """Print a subdot's stable folder, adding the subdot to the dot if it is new (the dot
    must exist: dm init makes it, so that a typo makes nothing).

    The folder's contents follow the dot's current branch; point your app's data store at it.

    \b
    Example:  redis-server --dir "$(dm path app.clicks-db)"
              initdb -D "$(dm path --owner postgres app.users-db)"   # as postgres
    """
    folder = c.repo.path(name, owner)
    if as_json:
        emit_json({"name": name, "path": str(folder)})
        return
    click.echo(str(folder))


def _state(s: dot_ops.DotStatus) -> str:
    if s.busy is not None:
        pid, command = s.busy
        return f"busy (dm {command}, pid {pid})" if command else f"busy (pid {pid})"
    return s.state


def _status_json(s: dot_ops.DotStatus) -> dict[str, Any]:
    return {"name": s.name, "current": s.current, "branch": s.branch,
            "head": s.head.hex() if s.head else None, "state": s.state, "dirty": s.dirty,
            "busy": {"pid": s.busy[0], "command": s.busy[1]} if s.busy else None,
            "size": s.size,
            "last_commit": {"message": s.head_message, "timestamp": iso(s.head_timestamp_ns)}
            if s.head_timestamp_ns else None,
            "subdots": {k: str(v) for k, v in s.subdots.items()}, "branches": s.branches,
            "writers": [{"pid": w.pid, "name": w.name, "paths": list(w.paths)}
                        for w in s.writers],
            "containers": [{"id": k.id, "name": k.name, "state": k.state,
                            "volumes": list(k.volumes)} for k in s.containers],
            "remotes": s.remotes, "backend": s.backend, "kept_states": s.kept_states,
            "commits": s.commits, "uncommitted": s.uncommitted}


@cli.command(name="list")
@click.option("--remote", default=None, metavar="HUB",
              help="List the dots you may read on this hub instead (nothing is cloned).")
@json_flag
@pass_ctx
def list_(c: Ctx, remote: str | None, as_json: bool) -> None:
    """List dots: current (*), branch, size, commits, uncommitted bytes (of files added or
    changed since the last commit), state (clean, dirty, busy), last commit.

    \b
    Example:  dm list --json
              dm list --remote hub
    """
    if remote is not None:
        from dotmesh.cli import remote_read

        return remote_read.list_dots(c, remote, as_json)
    statuses = c.repo.statuses()
    if as_json:
        emit_json([_status_json(s) for s in statuses])
        return
    if not statuses:
        click.echo("No dots yet: create one with dm init DOT")
        return
    table([["*" if s.current else "", s.name, s.branch,
            human_size(s.size) if s.size is not None else "-", str(s.commits),
            human_size(s.uncommitted) if s.uncommitted is not None else "-", _state(s),
            ",".join(k.name for k in s.containers) or "-",
            f"{s.head.hex()[:12]} {first_line(s.head_message or '')}" if s.head else "-"]
           for s in statuses],
          ["", "DOT", "BRANCH", "SIZE", "COMMITS", "UNCOMMITTED", "STATE", "CONTAINERS",
           "LAST COMMIT"])


@cli.group()
def dot() -> None:
    """Show or delete dots."""


@dot.command("show")
@click.argument("name", required=False)
@json_flag
@pass_ctx
def dot_show(c: Ctx, name: str | None, as_json: bool) -> None:
    """Show a dot's branch, head, subdots and their folders (default: the current dot).

    \b
    Example:  dm dot show app
    """
    s = c.dot(name).status()
    if as_json:
        emit_json(_status_json(s))
        return
    click.echo(f"Dot {s.name}" + (" (current)" if s.current else ""))
    click.echo(f"  branch:   {s.branch}  (branches: {', '.join(s.branches)})")
    click.echo(f"  head:     {s.head.hex() if s.head else '-'}")
    size = f", {human_size(s.size)}" if s.size is not None else ""
    changed = (f", {human_size(s.uncommitted)} uncommitted" if s.uncommitted else "")
    click.echo(f"  state:    {_state(s)}{size}{changed}")
    click.echo(f"  commits:  {s.commits}")
    if s.state.startswith("unfinished"):
        click.echo("            (interrupted: the next dm command that changes the dot "
                   "finishes it, e.g. dm commit)")
    click.echo("  subdots:")
    for sub, p in s.subdots.items():
        click.echo(f"    {sub:<20} {p}")
    click.echo("  writers:  " + (", ".join(map(str, s.writers)) if s.writers else "none"))
    click.echo("  containers: " + (", ".join(f"{k.name} ({k.state})" for k in s.containers)
                                   if s.containers else "none"))
    click.echo("  remotes:  " + (", ".join(f"{r} ({d})" for r, d in s.remotes.items())
                                 if s.remotes else "none"))
    kept_note = f" ({s.kept_states} kept states)" if s.backend != "plain" else ""
    click.echo(f"  backend:  {s.backend}{kept_note}")


@dot.command("set-upstream")
@click.argument("args", nargs=-1, metavar="[DOT] REMOTE REMOTE-DOT")
@json_flag
@pass_ctx
def dot_set_upstream(c: Ctx, args: tuple[str, ...], as_json: bool) -> None:
    """Say which dot on REMOTE a dot (default: the current one) pushes to and pulls from,
    as Dotmesh's command did. On a hub REMOTE-DOT is NAMESPACE/DOT, or DOT in your own
    namespace. dm dot show lists it under remotes; a push or pull with --remote-name
    changes it again.

    \b
    Example:  dm dot set-upstream hub alice/app
              dm dot set-upstream app hub shared-app   # your namespace on hub
    """
    if len(args) not in (2, 3):
        raise click.UsageError("dm dot set-upstream takes [DOT] REMOTE REMOTE-DOT")
    *dot_name, remote_name, remote_dot = args
    d = c.dot(dot_name[0] if dot_name else None)
    rdot = d.set_upstream(remote_name, remote_dot)
    if as_json:
        emit_json({"dot": d.name, "remote": remote_name, "remote_dot": rdot})
        return
    click.echo(f"Dot {d.name} now pushes to and pulls from {remote_name}'s {rdot}")


@dot.command("delete")
@click.option("-f", "--force", is_flag=True, help="Really delete it.")
@click.option("--stop-writers", is_flag=True,
              help="Stop processes and containers using the dot instead of refusing.")
@click.argument("name")
@json_flag
@pass_ctx
def dot_delete(c: Ctx, force: bool, stop_writers: bool, name: str, as_json: bool) -> None:
    """Delete a dot: its folders, branches and history (a new dot of that name starts
    empty). Refused while processes or containers use it.

    \b
    Example:  dm dot delete -f app
    """
    stopped = c.repo.dot(name).delete(stop_writers, force)
    if as_json:
        emit_json({"deleted": name, **_stopped_json(stopped)})
        return
    if stopped.processes or stopped.containers:
        click.echo("Stopped " + ", ".join(map(str, [*stopped.processes, *stopped.containers])))
    click.echo(f"Deleted dot {name}")


@cli.group()
def subdot() -> None:
    """List a dot's subdots and what they hold, or say what one holds."""


@subdot.command("list")
@click.argument("dot_name", metavar="[DOT]", required=False)
@json_flag
@pass_ctx
def subdot_list(c: Ctx, dot_name: str | None, as_json: bool) -> None:
    """List the subdots of a dot (default: the current one), each with its folder and what
    dm diff --data reads it as: the kind set with dm subdot set-kind, else the one detected.

    \b
    Example:  dm subdot list app
    """
    kinds = c.dot(dot_name).subdot_kinds()
    if as_json:
        emit_json([{"subdot": k.subdot, "folder": str(k.folder), "kind": k.kind,
                    "kind_set": k.kind_set} for k in kinds])
        return
    table([[k.subdot, f"{k.kind}{'' if k.kind_set else ' (detected)'}", str(k.folder)]
           for k in kinds], ["SUBDOT", "KIND", "FOLDER"])


@subdot.command("set-kind")
@click.argument("volume", metavar="DOT.SUBDOT")
@click.argument("kind", type=click.Choice(["postgres", "redis", "sqlite", "files", "auto"]))
@json_flag
@pass_ctx
def subdot_set_kind(c: Ctx, volume: str, kind: str, as_json: bool) -> None:
    """Say what a subdot holds, for dm diff --data, where detection (PG_VERSION, an AOF
    or dump.rdb, a SQLite header) would guess wrong; auto detects again.

    \b
    Example:  dm subdot set-kind app.uploads files   # SQLite files in it are only files
    """
    vol = VolumeName.parse(volume)
    c.repo.dot(vol.dot).set_kind(vol.subdot, kind)
    if as_json:
        emit_json({"dot": vol.dot, "subdot": vol.subdot, "kind": kind})
        return
    click.echo(f"{vol} is read as {kind}" if kind != "auto"
               else f"{vol}'s kind is detected again")


# ------------------------------------------------------------------ history


@cli.command()
@click.option("-m", "--message", required=True, help="What this state is.")
@click.option("-d", "--metadata", multiple=True, metavar="KEY=VALUE",
              help="Free-form metadata; repeatable.")
@click.option("--author", default=None, help="Default: $DM_AUTHOR or your user name.")
@click.option("--no-freeze", is_flag=True, help="Do not stop running writers (quiet data).")
@click.option("--freeze-timeout", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="Thaw writers and fail if the capture takes longer.")
@json_flag
@pass_ctx
def commit(c: Ctx, message: str, metadata: tuple[str, ...], author: str | None,
           no_freeze: bool, freeze_timeout: float, as_json: bool) -> None:
    """Commit every subdot of the current dot at once.

    Processes using the dot's folders are found and, after a first copy made while they run,
    frozen together for a short final pass, so all subdots are captured at one point in time.

    \b
    Example:  dm commit -m "two users, ten clicks" -d ticket=BUG-42
    """
    dot = c.dot()
    meta = _metadata(metadata)
    with progress_bar("Committing") as bar:
        r = dot.commit(message, meta, not no_freeze, freeze_timeout, author, bar)
    if as_json:
        emit_json({"id": r.id.hex(), "dot": dot.name, "files_read": r.files_read,
                   "bytes_read": r.bytes_read, "bytes_stored": r.bytes_stored,
                   "freeze_ms": float(r.commit.metadata.get("dm.freeze_ms", 0)) or None,
                   "freeze_bytes_read": r.frozen_bytes_read,
                   "entries_looked_at": r.looked_at})
        return
    click.echo(f"[{dot.branch} {r.id.hex()[:12]}] {first_line(message)}")
    files = f"{r.files_read} {'file' if r.files_read == 1 else 'files'}"
    info(f"  read {files if not r.commit.parents else files.replace(' ', ' changed ', 1)} "
         f"({human_size(r.bytes_read)}), stored {human_size(r.bytes_stored)}")
    if "dm.freeze_ms" in r.commit.metadata:
        info(f"  froze {grouped_writers(r.commit.metadata['dm.writers'])} for "
             f"{r.commit.metadata['dm.freeze_ms']} ms, reading "
             f"{human_size(r.frozen_bytes_read)} meanwhile")


def _metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    """``-d KEY=VALUE`` options as a dict."""
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad metadata {p!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _commit_json(oid: bytes, cm: Any) -> dict[str, Any]:
    return {"id": oid.hex(), "parents": [p.hex() for p in cm.parents], "message": cm.message,
            "author": cm.author, "timestamp": iso(cm.timestamp_ns), "metadata": cm.metadata,
            "subdots": sorted(cm.subdots)}


@cli.command()
@click.argument("ref", required=False)
@click.option("-n", "--max-count", type=click.IntRange(min=0), default=None,
              help="Show at most N commits.")
@click.option("--oneline", is_flag=True, help="One line a commit: short id and subject.")
@click.option("--remote", default=None, metavar="HUB", help="Read the log on this hub "
              "(REF is then NAMESPACE/DOT[@REF], default the current dot's).")
@json_flag
@pass_ctx
def log(c: Ctx, ref: str | None, max_count: int | None, oneline: bool, remote: str | None,
        as_json: bool) -> None:
    """Show the current branch's commits, newest first (or REF's: a branch, a commit).

    \b
    Example:  dm log -n 5
              dm log --oneline experiment
              dm log --remote hub alice/app@fix/login
    """
    if remote is not None:
        from dotmesh.cli import remote_read

        return remote_read.log(c, remote, ref, max_count, oneline, as_json)
    entries = [(e.id, e.commit) for e in c.dot().log(ref or "HEAD", max_count)]
    if as_json:
        emit_json([_commit_json(oid, cm) for oid, cm in entries])
        return
    if not entries:
        click.echo("No commits yet: make one with dm commit -m MSG")
    if oneline:
        for oid, cm in entries:
            click.echo(f"{oid.hex()[:12]} {safe(first_line(cm.message))}")
        return
    for oid, cm in entries:
        commit_header(oid, cm)


@cli.command()
@click.argument("remote_dot", metavar="[NAMESPACE/DOT]", required=False)
@click.option("--remote", default=None, metavar="HUB",
              help="List the branches of a dot on this hub (default: the current dot's).")
@json_flag
@pass_ctx
def branch(c: Ctx, remote_dot: str | None, remote: str | None, as_json: bool) -> None:
    """List the current dot's branches (* marks the current one).

    \b
    Example:  dm branch
              dm branch --remote hub alice/app
    """
    if remote is not None:
        from dotmesh.cli import remote_read

        return remote_read.branches(c, remote, remote_dot, as_json)
    if remote_dot is not None:
        raise UsageError("dm branch takes NAMESPACE/DOT only with --remote HUB")
    dot = c.dot()
    current, branches = dot.branch, dot.branches()
    if as_json:
        emit_json([{"name": b, "current": b == current, "head": h.hex() if h else None}
                   for b, h in branches.items()])
        return
    for b in branches:
        click.echo(f"{'*' if b == current else ' '} {b}")


stop_writers_flag = click.option(
    "--stop-writers", is_flag=True,
    help="Stop processes using the dot (SIGTERM, then SIGKILL) instead of refusing.")


def _stopped_json(stopped: Stopped) -> dict[str, Any]:
    return {"stopped": [{"pid": w.pid, "name": w.name} for w in stopped.processes],
            "restarted": [k.name for k in stopped.containers]}


def _report_stopped(stopped: Stopped) -> None:
    if stopped.processes:
        click.echo(f"Stopped {', '.join(map(str, stopped.processes))}; dm does not restart "
                   "processes it did not start: start them again on the restored data")
    if stopped.containers:
        click.echo("Restarted " + ", ".join(map(str, stopped.containers))
                   + " on the restored data")


@cli.command()
@click.option("-b", "create", is_flag=True,
              help="Create BRANCH first, at START (any commit, branch or HEAD~N; default HEAD).")
@stop_writers_flag
@click.argument("branch_name", metavar="BRANCH")
@click.argument("start", metavar="[START]", required=False)
@json_flag
@pass_ctx
def checkout(c: Ctx, create: bool, stop_writers: bool, branch_name: str,
             start: str | None, as_json: bool) -> None:
    """Switch the current dot to BRANCH; uncommitted changes stay with their branch.

    \b
    Example:  dm checkout -b experiment   # then later: dm checkout master
              dm checkout -b bug-42 HEAD~3   # a branch at an older state
    """
    with progress_bar("Checking out") as bar:
        dot = c.dot()
        r = dot.checkout(branch_name, create, start, stop_writers, bar)
    if as_json:
        head = dot.branches().get(branch_name)
        emit_json({"dot": dot.name, "branch": branch_name, "created": create, "moved": r.moved,
                   "head": head.hex() if head else None, **_stopped_json(r.stopped)})
        return
    _report_stopped(r.stopped)
    if not r.moved:
        click.echo(f"Already on {branch_name}")
    else:
        click.echo(f"Switched to {'a new ' if create else ''}branch {branch_name}")


@cli.command()
@click.option("--hard", is_flag=True,
              help="Accepted for git's habit: every reset is hard (there is no index).")
@click.argument("ref", default="HEAD")
@stop_writers_flag
@json_flag
@pass_ctx
def reset(c: Ctx, hard: bool, ref: str, stop_writers: bool, as_json: bool) -> None:
    """Move the current branch to REF and make the data match it.

    The working state being discarded is stored first and listed by dm reflog (on btrfs
    and XFS, kept as a snapshot named discarded-..., read only if you reset to it).
    `dm reset REF` and `dm reset --hard REF` are the same (as in Dotmesh: there is no
    index whose state a soft reset would keep).

    \b
    Example:  dm reset --hard HEAD^
              dm reset bug-42
    """
    del hard  # every reset is hard
    dot = c.dot()
    with progress_bar("Resetting") as bar:
        r = dot.reset(ref, stop_writers, bar)
    if as_json:
        emit_json({"old": r.old.hex() if r.old else None, "new": r.new.hex(),
                   "saved": r.saved.hex() if r.saved else None, "kept_as": r.kept_as,
                   **_stopped_json(r.stopped)})
        return
    _report_stopped(r.stopped)
    click.echo(f"HEAD is now at {r.new.hex()[:12]} {first_line(dot.commit_of(r.new).message)}")
    if r.saved:
        click.echo(f"The discarded working state is saved as {r.saved.hex()[:12]} "
                   f"(dm reflog; dm reset --hard {r.saved.hex()[:12]} brings it back)")
    elif r.kept_as:
        click.echo(f"The discarded working state is kept as {r.kept_as} "
                   f"(dm reflog; dm reset --hard {r.kept_as} brings it back)")


@cli.command()
@click.option("-n", "--max-count", type=click.IntRange(min=0), default=None)
@json_flag
@pass_ctx
def reflog(c: Ctx, max_count: int | None, as_json: bool) -> None:
    """Show how the current dot's branches moved, and saved working states.

    \b
    Example:  dm reflog -n 10
    """
    entries = c.dot().reflog(max_count)

    def hx(x: bytes | None) -> str | None:
        return x.hex() if x else None

    if as_json:
        emit_json([{"branch": e.branch, "timestamp": iso(e.ts_ns), "action": e.action,
                    "old": hx(e.old), "new": hx(e.new), "saved": hx(e.saved),
                    "kept_as": e.kept_as, "kept": list(e.kept), "message": e.message}
                   for e in entries])
        return
    for e in entries:
        line = f"{(hx(e.new) or '-')[:12]:<12}  {e.branch}  {e.action}: {first_line(e.message)}"
        if e.saved:
            line += f"  (working state saved as {e.saved.hex()[:12]})"
        elif e.kept:
            line += f"  (working state kept as {', '.join(e.kept)})"
        click.echo(f"{when(e.ts_ns)}  {line}")


@cli.command()
@click.argument("refs", nargs=-1, metavar="[REF [REF]]")
@click.option("--stat", "stat_only", is_flag=True, help="Only counts per subdot.")
@click.option("--data", "data", is_flag=True,
              help="What changed inside the data stores: Redis keys, SQLite rows and "
                   "schema, text file lines.")
@click.option("--subdot", default=None, help="With --data: only this subdot.")
@json_flag
@pass_ctx
def diff(c: Ctx, refs: tuple[str, ...], stat_only: bool, data: bool, subdot: str | None,
         as_json: bool) -> None:
    """Show files added, removed and changed, per subdot.

    With no REF: HEAD against the working state; one REF: REF against the working state;
    two: the first against the second.

    \b
    Example:  dm diff HEAD^ HEAD --stat
              dm diff --data HEAD^ HEAD   # keys and rows, not file names
    """
    if len(refs) > 2:
        raise click.UsageError("dm diff takes at most two refs")
    dot = c.dot()
    a = refs[0] if refs else None
    b = refs[1] if len(refs) > 1 else None
    if subdot is not None and not data:
        raise click.UsageError("--subdot goes with --data")
    if data:
        if stat_only:
            raise click.UsageError("--stat and --data do not go together")
        from dotmesh.cli.render import data_report

        reports = dot.diff_data(a, b, subdot)
        if as_json:
            emit_json([r.to_json() for r in reports])
        else:
            data_report(reports)
        return
    changes = dot.diff(a, b)
    stats: dict[str, dict[str, int]] = {}
    for ch in changes:
        s = stats.setdefault(ch.subdot, {"added": 0, "removed": 0, "changed": 0})
        s[ch.status] += 1
    if as_json:
        emit_json({"stat": stats} if stat_only else [ch.__dict__ for ch in changes])
        return
    if stat_only:
        for sub, s in stats.items():
            click.echo(f"{sub}: {s['added']} added, {s['removed']} removed, "
                       f"{s['changed']} changed")
        if not stats:
            click.echo("No changes")
        return
    marks = {"added": "+", "removed": "-", "changed": "M"}
    for ch in changes:
        click.echo(f"{marks[ch.status]} {ch.subdot}:{safe(ch.path)}")
    if not changes:
        click.echo("No changes")


@cli.group()
def hook() -> None:
    """Commands run before the freeze and after the thaw of a commit."""


@hook.command("add")
@click.argument("stage", type=click.Choice(["pre-freeze", "post-thaw"]))
@click.argument("command")
@click.option("--subdot", default=None, help="Run it for this subdot (DM_PATH is its folder).")
@click.option("--timeout", type=float, default=60.0, show_default=True, metavar="SECONDS")
@json_flag
@pass_ctx
def hook_add(c: Ctx, stage: str, command: str, subdot: str | None, timeout: float,
             as_json: bool) -> None:
    """Add a hook to the current dot; it runs with DM_DOT, DM_SUBDOT and DM_PATH set.

    \b
    Example:  dm hook add pre-freeze --subdot users-db 'psql -h /tmp -c CHECKPOINT'
    """
    dot = c.dot()
    hook_id = dot.add_hook(stage, command, subdot, timeout)
    if as_json:
        emit_json({"id": hook_id, "dot": dot.name, "stage": stage, "subdot": subdot,
                   "command": command, "timeout": timeout})
        return
    click.echo(f"Added hook #{hook_id} ({stage}) to {dot.name}")


@hook.command("list")
@json_flag
@pass_ctx
def hook_list(c: Ctx, as_json: bool) -> None:
    """List the current dot's hooks.

    \b
    Example:  dm hook list --json
    """
    hooks = c.dot().hooks()
    if as_json:
        emit_json([{"id": h.id, "stage": h.stage, "subdot": h.subdot, "command": h.command,
                    "timeout": h.timeout} for h in hooks])
        return
    for h in hooks:
        click.echo(f"#{h.id}  {h.stage:<10}  {h.subdot or '-':<12}  {h.timeout:g}s  {h.command}")
    if not hooks:
        click.echo("No hooks")


@hook.command("rm")
@click.argument("hook_id", type=int, metavar="ID")
@json_flag
@pass_ctx
def hook_rm(c: Ctx, hook_id: int, as_json: bool) -> None:
    """Remove a hook by its number.

    \b
    Example:  dm hook rm 2
    """
    c.dot().remove_hook(hook_id)
    if as_json:
        emit_json({"removed": hook_id})
        return
    click.echo(f"Removed hook #{hook_id}")


UNIT = """[Unit]
Description=dotmesh: the {driver} Docker volume plugin
Documentation=dm serve --help
Before=docker.service

[Service]
Environment=DM_HOME={home}
Environment=DM_DRIVER={driver}
ExecStart={dm} serve --socket {socket}
Restart=always

[Install]
WantedBy=multi-user.target docker.service
"""


@cli.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="Where dockerd finds the plugin; its file name is the driver's name "
                   "(default: /run/docker/plugins/dm.sock, or DM_DRIVER.sock if set).")
@click.option("--quiet", is_flag=True, help="Do not log each request on stderr.")
@click.option("--install", is_flag=True,
              help="Write a systemd unit that runs this server, instead of running it.")
@click.option("--unit-path", type=click.Path(path_type=Path),
              default="/etc/systemd/system/dm.service", show_default=True)
@pass_ctx
def serve(c: Ctx, socket_path: Path | None, quiet: bool, install: bool,
          unit_path: Path) -> None:
    """Serve dots as Docker volumes (the volume driver "dm"), in the foreground.

    A volume named DOT.SUBDOT is subdot SUBDOT of dot DOT; compose prefixes its project, so
    app.clicks-db in project mobycounter is dot mobycounter_app. Start it before dockerd.

    Two engines side by side (two stores, e.g. a test store beside the real one): dockerd
    names a plugin after its socket, so give the second its own socket name and store, and
    set DM_DRIVER to that name for its dm commands too (commit, checkout and reset find the
    containers to pause or restart by driver). Volumes then say driver: dmtest. Keep each
    socket served: dockerd remembers a plugin name it has used until it restarts.

    \b
    Example:  dm serve &  docker volume create -d dm app.clicks-db
              dm serve --install && systemctl enable --now dm
    \b
    Two engines:
      export DM_HOME=/srv/dm-test DM_DRIVER=dmtest
      dm serve --socket /run/docker/plugins/dmtest.sock &
      docker volume create -d dmtest app.clicks-db   # a dot of /srv/dm-test
      dm serve --install --unit-path /etc/systemd/system/dmtest.service
    """
    if socket_path is None:
        socket_path = DEFAULT_SOCKET.with_name(f"{os.environ.get('DM_DRIVER') or 'dm'}.sock")
    if install:
        dm_bin = Path(sys.argv[0]).resolve()
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = unit_path.with_suffix(".tmp")
        tmp.write_text(UNIT.format(home=c.path.absolute(), dm=dm_bin,
                                   socket=socket_path.absolute(),
                                   driver=socket_path.name.removesuffix(".sock")))
        os.replace(tmp, unit_path)
        click.echo(f"Wrote {unit_path}; run: systemctl daemon-reload && systemctl enable --now "
                   f"{unit_path.stem}")
        return
    name = socket_path.name.removesuffix(".sock")
    if name != (os.environ.get("DM_DRIVER") or "dm"):
        click.echo(f"dm: note: dockerd knows this plugin as driver {name}: run this store's "
                   f"dm commands with DM_DRIVER={name}, so they find its containers", err=True)
    from dotmesh.server.plugin import serve as run_server  # noqa: PLC0415 - server imports

    run_server(c.home, socket_path.absolute(), quiet)


@cli.command()
@click.option("--repair", is_flag=True,
              help="Drop what cannot be trusted and keep all that can; rebuild an unreadable "
                   "index from the packs.")
@json_flag
@pass_ctx
def fsck(c: Ctx, repair: bool, as_json: bool) -> None:
    """Verify every stored object, every row of the index and that refs reach whole history.

    With --repair: damaged rows and stat caches are dropped, a branch whose head is lost
    moves back to the newest whole commit of its reflog, and an index that cannot be read is
    rebuilt from the packs (what is lost is listed). Packed data is never deleted.

    \b
    Example:  dm fsck --repair
    """
    from dotmesh.api import Repo

    rebuilt: list[str] = []
    try:
        repo = c.repo
    except DamagedIndex:  # so damaged that the store does not open
        if not repair:
            raise
        rebuilt = Repo.rebuild_index(c.path)
        repo = c.repo
    with progress_bar("Verifying", repo.object_count(), "objects") as bar:
        result = repo.fsck(repair, bar)
    r, found, repaired = result.report, result.found, [*rebuilt, *result.repaired]
    remaining = r.problems
    if as_json:
        emit_json({"ok": r.ok, "objects": r.objects, "commits": r.commits, "trees": r.trees,
                   "problems": found, "repaired": repaired, "remaining": remaining})
    else:
        for p in found:
            click.echo(f"problem: {safe(p)}")
        for p in repaired:
            click.echo(f"repaired: {safe(p)}")
        click.echo(f"checked {r.objects} objects, {r.commits} commits, {r.trees} trees: "
                   + ("no problems" if r.ok else f"{len(remaining)} problems"))
    if not r.ok:
        raise Corrupt(f"the store has {len(remaining)} problems (listed above)"
                      + ("" if repair else ": dm fsck --repair drops what cannot be trusted"))


@cli.command()
@json_flag
@pass_ctx
def version(c: Ctx, as_json: bool) -> None:
    """Print dm's version, the store format it writes, and the store's folder backend.

    \b
    Example:  dm version --json
    """
    from dotmesh.api import Repo

    backend = Repo.backend_at(c.path)
    if as_json:
        emit_json({"version": __version__, "format": FORMAT_VERSION, "backend": backend})
    else:
        click.echo(f"dm {__version__} (store format {FORMAT_VERSION}, {backend} backend)")


@cli.command("config")
@click.argument("key", required=False)
@click.argument("value", required=False)
@click.option("--unset", is_flag=True, help="Go back to the default.")
@json_flag
@pass_ctx
def config_(c: Ctx, key: str | None, value: str | None, unset: bool, as_json: bool) -> None:
    """Show or change the store's settings (no KEY: all of them, with their meaning).

    \b
    Example:  dm config snapshots.keep-commits 5
              dm config snapshots.keep-days
    """
    if key is None:
        values, meaning = c.repo.settings(), c.repo.setting_help()
        if as_json:
            emit_json(values)
            return
        for k, v in values.items():
            click.echo(f"{k} = {v}    # {meaning[k]}")
        return
    if unset and value is not None:
        raise UsageError("--unset takes no VALUE")
    now = (c.repo.set_setting(key, None) if unset else
           c.repo.set_setting(key, value) if value is not None else c.repo.setting(key))
    if as_json:
        emit_json({key: now})
    else:
        click.echo(now)


@cli.group()
def pool() -> None:
    """A btrfs pool in a file, for a store whose disk cannot snapshot (root only)."""


def _pool_out(p: PoolInfo, as_json: bool) -> None:
    if as_json:
        emit_json({"image": str(p.image), "mount": str(p.mount), "mounted": p.mounted,
                   "size": p.size, "used": p.used, "free": p.free})
        return
    click.echo(f"pool {p.image} ({human_size(p.size)}) "
               + (f"mounted on {p.mount}: {human_size(p.used or 0)} used, "
                  f"{human_size(p.free or 0)} free" if p.mounted else "not mounted"))


size_option = click.option("--size", required=True, metavar="SIZE",
                           help="e.g. 20G (sparse: the file grows as the pool fills).")


@pool.command("create")
@size_option
@json_flag
@pass_ctx
def pool_create(c: Ctx, size: str, as_json: bool) -> None:
    """Make a btrfs filesystem in a file under the store and mount it where the dots'
    folders go: commits, resets and branches then cost milliseconds. Before the first dot.

    \b
    Example:  sudo dm pool create --size 20G
    """
    from dotmesh.fs.pool import parse_size

    _pool_out(c.repo.create_pool(parse_size(size)), as_json)


@pool.command("show")
@json_flag
@pass_ctx
def pool_show(c: Ctx, as_json: bool) -> None:
    """Show the pool's file, size and use.

    \b
    Example:  dm pool show --json
    """
    _pool_out(c.repo.pool(), as_json)


@pool.command("grow")
@size_option
@json_flag
@pass_ctx
def pool_grow(c: Ctx, size: str, as_json: bool) -> None:
    """Make the pool bigger, while it is in use.

    \b
    Example:  sudo dm pool grow --size 40G
    """
    from dotmesh.fs.pool import parse_size

    _pool_out(c.repo.grow_pool(parse_size(size)), as_json)


cli_remote.register(cli)
cli_hub.register(cli)
cli_space.register(cli)  # gc, reflog expire, branch -d/-D
cli_daemon.register(cli)
cli_browse.register(cli)  # status, show, ls, cat, export, mount, umount
cli_tag.register(cli)
cli_ui.register(cli)  # dm ui: the web UI over the local store
cli_completion.register(cli)
cli_manpages.register(cli)  # dm help [--man DIR]
cli_completion.install(cli)  # completers for the arguments that name dots, branches, refs...
cli_output.install(cli)  # last: --quiet and --progress on every command


# ------------------------------------------------------------------ the one error handler


def _as_error(e: BaseException) -> DotmeshError | None:
    """What went wrong, as one of dm's errors (with its exit code); None for a clean end."""
    if isinstance(e, DotmeshError):
        return e
    if isinstance(e, click.exceptions.Exit | BrokenPipeError):
        return None
    if isinstance(e, click.ClickException):
        return (UsageError if e.exit_code == UsageError.exit_code else DotmeshError)(
            e.format_message())
    if isinstance(e, click.exceptions.Abort):
        return Interrupted("aborted")
    if isinstance(e, KeyboardInterrupt):
        return Interrupted("interrupted")
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # A write through a descriptor names no file: the store is where dm writes.
            return OutOfSpace(f"no space left on the device holding "
                              f"{e.filename or _home_path()}; free some space and run the "
                              "command again")
        return DotmeshError(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    import sqlite3  # here: the commands that need no store never load it

    if isinstance(e, sqlite3.OperationalError):
        if "full" in str(e):
            return OutOfSpace(f"no space left for the store's index in {_home_path()}; free some "
                              "space and run the command again")
        return OutOfSpace(f"the store's index in {_home_path()} failed: {e}")
    if isinstance(e, sqlite3.DatabaseError):
        return DamagedIndex(f"the store's index in {_home_path()} is damaged ({e}): run dm fsck "
                            "--repair")
    if os.environ.get("DM_DEBUG"):  # a bug: still one line, with the details on request
        import traceback

        traceback.print_exception(e)
    return InternalError(f"internal error: {type(e).__name__}: {e} (set DM_DEBUG=1 for details)")


def _wants_json(args: list[str]) -> bool:
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def run(args: list[str] | None = None, prog: str = "dm") -> int:
    """Run the CLI and return its exit code; every failure is one line on stderr (one JSON
    object under --json: ``{"error": message, "type": class, "exit_code": n}``)."""
    argv = sys.argv[1:] if args is None else args
    try:
        cli.main(args=argv, prog_name=prog, standalone_mode=False)
        return 0
    except Exception as e:  # noqa: BLE001 - the one place every failure ends
        failure = _as_error(e)
        exit_code = e.exit_code if isinstance(e, click.exceptions.Exit) else 0
    except KeyboardInterrupt as e:
        failure, exit_code = _as_error(e), 0
    if failure is None:
        return exit_code
    if _wants_json(argv):
        click.echo(json.dumps({"error": str(failure), "type": type(failure).__name__,
                               "exit_code": failure.exit_code}), err=True)
    else:
        click.echo(f"{prog}: error: {safe(str(failure))}", err=True)
    return failure.exit_code


def main() -> None:
    one_shot()  # servers say otherwise when they start (heap.long_running)
    code = run()
    # Python's exit would look at every object left for cycles (0.1-0.3 s after a commit
    # of 200,000 files): the process ends now, and its memory goes with it. The finalizers
    # of objects in cycles do not run then; dm's work never waits on one (files are closed
    # and data fsynced by the code that wrote them).
    gc.freeze()
    sys.exit(code)
