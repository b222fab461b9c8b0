"""``dm daemon start|stop|status``: the resident process that takes dm's start-up off every
command (:mod:`dotmesh.cli.daemon_server` says how it works)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from dotmesh.cli.context import json_flag
from dotmesh.cli.render import emit_json
from dotmesh.errors import Conflict, DotmeshError, NotFound, UsageError

START_TIMEOUT = 60.0


def _describe(status: dict[str, Any]) -> str:
    up = time.time() - float(status.get("started", time.time()))
    return (f"dm daemon {status.get('pid')} listening on {status.get('socket')}, up "
            f"{up:.0f} s, {status.get('served', 0)} commands served "
            f"({status.get('readied', 0)} in a process readied ahead)")


@click.group()
def daemon() -> None:
    """Keep a warm dm process that runs every dm command, so none pays start-up.

    A short command (a btrfs commit, a reset to a kept state, a new branch) spends most of its
    time starting Python and importing dm. The daemon does that once, then forks per command:
    each runs with your terminal, folder, environment and umask, exactly as dm would. It serves
    only your user, through a socket in a folder only you can enter ($XDG_RUNTIME_DIR/dotmesh
    or /tmp/dotmesh-UID; $DM_DAEMON_SOCKET overrides). Without it, or with DM_DAEMON=off, dm
    runs each command itself; a daemon whose code changed (dm upgraded) makes way by itself.

    \b
    Example:
      dm daemon start && dm commit -m "fast" && dm daemon status
    """


@daemon.command()
@click.option("--foreground", is_flag=True,
              help="Run in this process until stopped (for a service manager).")
@json_flag
def start(foreground: bool, as_json: bool) -> None:
    """Start the daemon, unless one already runs.

    \b
    Example:  dm daemon start
    """
    from dotmesh.server import resident  # noqa: PLC0415 - not for every command's start-up

    path = resident.socket_path()
    folder = Path(path).parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not resident.private(str(folder)):
        raise UsageError(f"{folder} is not a folder of yours that only you may enter: the "
                         "daemon's socket cannot go there (set DM_DAEMON_SOCKET)")
    status = resident.control("status", path)
    started = status is None
    if status is None and foreground:
        from dotmesh.cli import daemon_server  # noqa: PLC0415 - it imports all of dm

        daemon_server.serve(path)
        return
    if status is None:
        import subprocess  # noqa: PLC0415 - only here (start-up of every other command)

        from dotmesh.cli import daemon_server  # noqa: PLC0415 - its name; imports are in serve()

        log = folder / "daemon.log"
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "ab") as err:
            child = subprocess.Popen([sys.executable, "-m", daemon_server.__name__, path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, start_new_session=True, cwd="/")
        deadline = time.monotonic() + START_TIMEOUT
        while status is None:
            if child.poll() is not None:
                status = resident.control("status", path)  # another start won the race
                if status is not None:
                    break
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise DotmeshError(f"the dm daemon did not start (exit {child.returncode}): "
                                   f"{tail[0]} (see {log})")
            if time.monotonic() > deadline:
                child.kill()
                raise DotmeshError(f"the dm daemon did not answer within {START_TIMEOUT:.0f} s "
                                   f"(see {log})")
            time.sleep(0.02)
            status = resident.control("status", path)
    if status.get("package") != resident.package():
        raise Conflict(f"the dm daemon at {path} runs another installation of dm "
                       f"({status.get('package')}); its commands run without it: stop it "
                       "with that dm, or set DM_DAEMON_SOCKET")
    if as_json:
        emit_json({**status, "started_now": started})
    else:
        click.echo(("started " if started else "already running: ") + _describe(status))


@daemon.command()
@json_flag
def stop(as_json: bool) -> None:
    """Stop the daemon; commands that it started finish first.

    \b
    Example:  dm daemon stop
    """
    from dotmesh.capture.proc import alive  # noqa: PLC0415
    from dotmesh.server import resident  # noqa: PLC0415 - not for every command's start-up

    status = resident.control("stop")
    if status is not None:  # it answers, then leaves: wait until it is gone (a zombie is
        deadline = time.monotonic() + 10  # gone: whoever adopted it may reap it late)
        while time.monotonic() < deadline and alive(status["pid"]):
            time.sleep(0.01)
    if as_json:
        emit_json({"stopped": status is not None, "pid": status and status.get("pid")})
    else:
        click.echo(f"stopped dm daemon {status['pid']}" if status else "no dm daemon was running")


@daemon.command()
@json_flag
def status(as_json: bool) -> None:
    """Say whether a daemon runs, where, and how many commands it served (exit 3 if none).

    \b
    Example:  dm daemon status --json
    """
    from dotmesh.server import resident  # noqa: PLC0415 - not for every command's start-up

    found = resident.control("status")
    if found is None:
        raise NotFound(f"no dm daemon answers at {resident.socket_path()}; start one with "
                       "dm daemon start")
    if as_json:
        emit_json(found)
    else:
        click.echo(_describe(found))


def register(cli: click.Group) -> None:
    cli.add_command(daemon)
