"""Commands that look without changing anything: ``dm status`` (the working state), and
``dm show``, ``dm ls``, ``dm cat`` and ``dm export`` (any commit; the work is in
ops/browse.py)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli.context import Ctx, json_flag, pass_ctx
from dotmesh.cli.render import (
    commit_header,
    emit_json,
    first_line,
    human_size,
    iso,
    progress_bar,
    safe,
    table,
    when,
)
from dotmesh.errors import UsageError

if TYPE_CHECKING:
    from dotmesh.model.objects import Entry
    from dotmesh.ops.browse import Shown

_KIND = {"f": "file", "d": "folder", "l": "symlink"}


def _shown_json(s: Shown) -> dict[str, Any]:
    cm = s.commit
    return {"id": s.id.hex(), "parents": [p.hex() for p in cm.parents], "author": cm.author,
            "timestamp": iso(cm.timestamp_ns), "message": cm.message, "metadata": cm.metadata,
            "freeze_ms": _freeze_ms(cm.metadata),
            "subdots": {name: {"files": z.files, "bytes": z.bytes}
                        for name, z in s.sizes.items()},
            "changes": {"added": s.added, "removed": s.removed, "changed": s.changed,
                        "bytes_added": s.bytes_added, "bytes_removed": s.bytes_removed}}


def _freeze_ms(metadata: dict[str, str]) -> float | None:
    try:
        return float(metadata["dm.freeze_ms"])
    except (KeyError, ValueError):
        return None


def _entry_json(path: str, e: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"path": path, "kind": _KIND.get(e.kind, e.kind), "mode": e.mode,
                           "uid": e.uid, "gid": e.gid, "mtime": iso(e.mtime_ns), "size": e.size}
    if e.kind == "l":
        out["target"] = e.ref
    return out


def _mode_text(e: Entry) -> str:
    kind = {"d": stat.S_IFDIR, "l": stat.S_IFLNK}.get(e.kind, stat.S_IFREG)
    return stat.filemode(kind | e.mode)


STATUS_PATHS = 20  # changed paths shown per subdot (all of them under --json)


def _writers_text(writers: list[Any]) -> str:
    """``postgres (7 processes), redis-server (pid 12)``: one line however many there are."""
    by_name: dict[str, list[int]] = {}
    for w in writers:
        by_name.setdefault(w.name, []).append(w.pid)
    return ", ".join(f"{safe(n)} (pid {pids[0]})" if len(pids) == 1
                     else f"{safe(n)} ({len(pids)} processes)" for n, pids in by_name.items())


def register(cli: click.Group) -> None:
    @cli.command()
    @json_flag
    @pass_ctx
    def status(c: Ctx, as_json: bool) -> None:
        """Show the current dot and branch, its head, what changed since (per subdot), who
        writes to it, and an operation a kill left unfinished.

        \b
        Example:  dm status
        """
        s = c.dot().status()
        if as_json:
            emit_json({"dot": s.name, "branch": s.branch,
                       "head": s.head.hex() if s.head else None,
                       "head_message": s.head_message, "state": s.state,
                       "busy": {"pid": s.busy[0], "command": s.busy[1]} if s.busy else None,
                       "uncommitted": s.uncommitted,
                       "changes": [ch.__dict__ for ch in s.changes],
                       "writers": [{"pid": w.pid, "name": w.name} for w in s.writers],
                       "containers": [{"name": k.name, "state": k.state}
                                      for k in s.containers]})
            return
        click.echo(f"On dot {safe(s.name)}, branch {safe(s.branch)}")
        if s.head is None:
            click.echo("No commits yet: make one with dm commit -m MSG")
        else:
            click.echo(f"HEAD {s.head.hex()[:12]} {safe(first_line(s.head_message or ''))} "
                       f"({when(s.head_timestamp_ns)})")
        if s.busy is not None:
            click.echo(f"Busy: dm {s.busy[1] or '?'} (pid {s.busy[0]}) is working on it; "
                       "run dm status again when it has finished")
        elif s.state.startswith("unfinished"):
            click.echo(f"An interrupted {s.state.removeprefix('unfinished ')} is unfinished: "
                       "the next dm command that changes the dot finishes it (e.g. dm commit)")
        elif s.state == "clean" and s.head is not None:
            click.echo("Nothing to commit: the working state is the head's")
        elif s.state == "clean":
            pass  # no commit, no files: "No commits yet" said it all
        else:
            click.echo(f"Changes since the head ({human_size(s.uncommitted or 0)} added or "
                       "changed):")
            marks = {"added": "+", "removed": "-", "changed": "M"}
            by_sub: dict[str, list[Any]] = {}
            for ch in s.changes:
                by_sub.setdefault(ch.subdot, []).append(ch)
            for sub, changes in by_sub.items():
                count = {k: sum(1 for ch in changes if ch.status == k) for k in marks}
                click.echo(f"  {safe(sub)}: {count['added']} added, {count['removed']} removed, "
                           f"{count['changed']} changed")
                for ch in changes[:STATUS_PATHS]:
                    click.echo(f"    {marks[ch.status]} {safe(ch.path)}")
                if len(changes) > STATUS_PATHS:
                    click.echo(f"    ... and {len(changes) - STATUS_PATHS} more (dm diff)")
        if s.writers:
            click.echo(f"Writers: {_writers_text(s.writers)}")
        if s.containers:
            click.echo("Containers: " + ", ".join(f"{safe(k.name)} ({k.state})"
                                                   for k in s.containers))

    @cli.command()
    @click.argument("ref", required=False)
    @json_flag
    @pass_ctx
    def show(c: Ctx, ref: str | None, as_json: bool) -> None:
        """Show a commit (default HEAD): who, when, why, its metadata and freeze, each
        subdot's size, and what it changed against its parent.

        \b
        Example:  dm show HEAD^
        """
        s = c.dot().show(ref or "HEAD")
        if as_json:
            emit_json(_shown_json(s))
            return
        cm = s.commit
        commit_header(s.id, cm, parents=True)
        table([[safe(name), f"{z.files:,}", human_size(z.bytes)]
               for name, z in s.sizes.items()], ["SUBDOT", "FILES", "SIZE"])
        against = "its parent" if cm.parents else "nothing (a first commit)"
        click.echo(f"\nAgainst {against}: {s.added:,} added, {s.removed:,} removed, "
                   f"{s.changed:,} changed (+{human_size(s.bytes_added)}, "
                   f"-{human_size(s.bytes_removed)})")

    @cli.command("ls")
    @click.argument("where", metavar="[REF[:SUBDOT[/PATH]]]", required=False)
    @click.option("-r", "--recursive", is_flag=True, help="Everything beneath, not one level.")
    @json_flag
    @pass_ctx
    @click.pass_context
    def ls_(cc: click.Context, c: Ctx, where: str | None, recursive: bool,
            as_json: bool) -> None:
        """List what a commit holds: its subdots (REF alone), or a folder or file in one
        (REF:SUBDOT/PATH), without checking anything out. With no argument, `dm ls` is
        `dm list` (the dots), as in Dotmesh; `dm ls HEAD` lists the head's subdots.

        \b
        Example:  dm ls HEAD~2:users-db/base
                  dm ls          # the same as dm list
        """
        if where is None:
            if recursive:
                raise click.UsageError("dm ls -r needs REF[:SUBDOT[/PATH]] (dm ls -r HEAD:db)")
            list_cmd = cli.get_command(cc, "list")
            assert list_cmd is not None
            cc.invoke(list_cmd, as_json=as_json)
            return
        found = c.dot().ls(where, recursive)
        at, sizes = found.where, found.subdots
        if sizes is not None:
            if as_json:
                emit_json([{"subdot": n, "files": z.files, "bytes": z.bytes}
                           for n, z in sizes.items()])
                return
            table([[safe(n), f"{z.files:,}", human_size(z.bytes)] for n, z in sizes.items()],
                  ["SUBDOT", "FILES", "SIZE"])
            return
        entries = found.entries
        if as_json:
            emit_json([_entry_json(p, e) for p, e in entries])
            return
        for path, e in entries:
            name = path if recursive or at.path == path else path.rpartition("/")[2]
            target = e.ref if isinstance(e.ref, str) else ""
            suffix = "/" if e.kind == "d" else f" -> {target}" if e.kind == "l" else ""
            click.echo(f"{_mode_text(e)} {e.size:>12} {when(e.mtime_ns)}  "
                       f"{safe(name)}{safe(str(suffix))}")

    @cli.command()
    @click.argument("where", metavar="REF:SUBDOT/PATH")
    @pass_ctx
    def cat(c: Ctx, where: str) -> None:
        """Write a file of any commit to standard output, as it was committed (streamed,
        every chunk checked against its id).

        \b
        Example:  dm cat HEAD^:uploads/logo.png > logo.png
        """
        pieces = c.dot().cat(where)
        out = sys.stdout.buffer
        try:
            for piece in pieces:
                out.write(piece)
            out.flush()
        except BrokenPipeError:  # `dm cat ... | head`: the reader has all it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)  # nothing is left to flush at exit
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


    @cli.command()
    @click.argument("ref")
    @click.argument("dest", type=click.Path(path_type=Path), required=False)
    @click.option("--subdot", default=None, help="Only this subdot, its files at the top.")
    @click.option("--tar", "as_tar", is_flag=True,
                  help="A tar stream on standard output instead of a folder.")
    @json_flag
    @pass_ctx
    def export(c: Ctx, ref: str, dest: Path | None, subdot: str | None, as_tar: bool,
               as_json: bool) -> None:
        """Write the state REF names into DEST, a new folder: one folder per subdot (or
        with --subdot, that subdot's files), byte-exact, holes kept. Nothing in the dot moves.

        \b
        Example:  dm export bug-42 /tmp/bug-42
                  dm export HEAD~2 --subdot users-db --tar | tar -t
        """
        dot = c.dot()
        if as_tar:
            if dest is not None:
                raise UsageError("--tar writes to standard output: give no DEST")
            if sys.stdout.isatty():
                raise UsageError("--tar writes a tar stream: redirect it to a file or a pipe")
            try:
                dot.export_tar(ref, sys.stdout.buffer, subdot)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            return
        if dest is None:
            raise UsageError("give a DEST folder to export into (or --tar)")
        with progress_bar("Exporting") as bar:
            written = dot.export(ref, dest.absolute(), subdot, bar)
        if as_json:
            emit_json({"ref": ref, "dest": str(dest.absolute()), "subdots": written})
        else:
            click.echo(f"Exported {ref} ({', '.join(written) or 'no subdots'}) to {dest}")


    @cli.command()
    @click.argument("ref", required=False)
    @click.argument("folder", type=click.Path(path_type=Path), required=False)
    @json_flag
    @pass_ctx
    def mount(c: Ctx, ref: str | None, folder: Path | None, as_json: bool) -> None:
        """Mount the commit REF at FOLDER (an empty folder), read-only: every subdot a
        folder, files read from the store as they are read. With no REF, list the mounts.
        gc keeps a mounted commit; dm umount FOLDER ends it.

        \b
        Example:  mkdir /tmp/bug && dm mount bug-42 /tmp/bug && ls /tmp/bug/users-db
        """
        if ref is None:
            views = c.repo.mounts()
            if as_json:
                emit_json([{"folder": m.folder, "dot": m.dot, "commit": m.commit.hex(),
                            "pid": m.pid, "serving": m.serving} for m in views])
            elif not views:
                click.echo("Nothing mounted: dm mount REF FOLDER")
            else:
                table([[safe(m.folder), safe(m.dot), m.commit.hex()[:12],
                         "yes" if m.serving else "no (dm umount it)"] for m in views],
                      ["FOLDER", "DOT", "COMMIT", "SERVING"])
            return
        if folder is None:
            raise UsageError("give the FOLDER to mount on: dm mount REF FOLDER")
        m = c.dot().mount(ref, folder)
        if as_json:
            emit_json({"folder": m.folder, "dot": m.dot, "commit": m.commit.hex(),
                       "pid": m.pid})
        else:
            click.echo(f"Mounted {m.commit.hex()[:12]} ({ref}) at {m.folder}, read-only")

    @cli.command()
    @click.argument("folder", type=click.Path(path_type=Path))
    @json_flag
    @pass_ctx
    def umount(c: Ctx, folder: Path, as_json: bool) -> None:
        """Unmount a commit dm mount mounted (gc may collect it again).

        \b
        Example:  dm umount /tmp/bug
        """
        m = c.repo.umount(folder)
        if as_json:
            emit_json({"folder": m.folder, "commit": m.commit.hex()})
        else:
            click.echo(f"Unmounted {m.commit.hex()[:12]} from {m.folder}")


__all__ = ["register"]
