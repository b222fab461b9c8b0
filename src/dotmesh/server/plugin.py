"""``dm serve``: Docker's legacy volume plugin protocol (v1) on a unix socket.

Every call is ``POST /<Method>`` with a JSON body (sometimes empty); every answer is JSON, with
``Err`` set to a one-line message on failure. This module only parses, dispatches to
:mod:`dotmesh.ops.volumes` and replies. The use cases run one at a time on a worker thread (one
SQLite connection), off the event loop, so Activate always answers at once; removing a folder
happens in the background after the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dotmesh.errors import AlreadyExists, DotmeshError, UsageError
from dotmesh.heap import long_running
from dotmesh.ops import volumes
from dotmesh.store.repo import Repo

Body = dict[str, Any]


class Plugin:
    """The handlers, by method name; each takes the request body and returns the answer."""

    def __init__(self, home: Repo, log: Callable[[str], None]) -> None:
        self.home = home
        self.log = log
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dm-plugin")
        self.methods: dict[str, Callable[[Body], Body]] = {
            "Plugin.Activate": lambda b: {"Implements": ["VolumeDriver"]},
            "VolumeDriver.Capabilities": lambda b: {"Capabilities": {"Scope": "local"}},
            "VolumeDriver.Create": self.create,
            "VolumeDriver.Remove": self.remove,
            "VolumeDriver.Mount": self.mount,
            "VolumeDriver.Unmount": self.unmount,
            "VolumeDriver.Path": self.path,
            "VolumeDriver.Get": self.get,
            "VolumeDriver.List": self.list,
        }

    def create(self, b: Body) -> Body:
        volumes.create(self.home, _name(b), b.get("Opts"))
        return {}

    def remove(self, b: Body) -> Body:
        moved = volumes.remove(self.home, _name(b))
        if moved:
            threading.Thread(target=volumes.empty_trash, args=(self.home.root,),
                             daemon=True).start()
        return {}

    def mount(self, b: Body) -> Body:
        return {"Mountpoint": volumes.mount(self.home, _name(b), str(b.get("ID") or "")
                                            ).mountpoint}

    def unmount(self, b: Body) -> Body:
        volumes.unmount(self.home, _name(b), str(b.get("ID") or ""))
        return {}

    def path(self, b: Body) -> Body:
        return {"Mountpoint": volumes.get(self.home, _name(b)).mountpoint}

    def get(self, b: Body) -> Body:
        v = volumes.get(self.home, _name(b))
        return {"Volume": {"Name": v.name, "Mountpoint": v.mountpoint, "Status": v.status}}

    def list(self, b: Body) -> Body:
        return {"Volumes": [{"Name": v.name, "Mountpoint": v.mountpoint}
                            for v in volumes.list_volumes(self.home)]}

    def call(self, method: str, body: Body) -> Body:
        """Run one handler; every failure becomes a one-line ``Err``."""
        handler = self.methods.get(method)
        if handler is None:
            return {"Err": f"dm does not implement {method}"}
        try:
            out = handler(body)
        except DotmeshError as e:
            return {"Err": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug; dockerd still gets one line
            return {"Err": f"internal error in dm serve: {type(e).__name__}: {e}"}
        return {"Err": "", **out} if method.startswith("VolumeDriver.") else out

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> JSONResponse:
            started = time.monotonic()
            method = request.path_params["method"]
            raw = await request.body()
            body: Body = {}
            try:
                parsed = json.loads(raw) if raw.strip() else {}
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
                body = parsed
            except ValueError as e:
                out: Body = {"Err": f"bad request body: {e}"}
            else:
                if method == "Plugin.Activate":  # never queued behind slower calls
                    out = self.call(method, body)
                else:
                    loop = asyncio.get_running_loop()
                    out = await loop.run_in_executor(self.worker, self.call, method, body)
            self.log(json.dumps({"method": method, "name": body.get("Name"),
                                 "err": out.get("Err") or None,
                                 "ms": round((time.monotonic() - started) * 1000, 1)}))
            return JSONResponse(out)

        return Starlette(routes=[Route("/{method}", endpoint, methods=["POST"])])


def _name(body: Body) -> str:
    name = body.get("Name")
    if not isinstance(name, str):
        raise UsageError("the request has no volume Name")
    return name


def bind(path: Path) -> socket.socket:
    """Listen on ``path``, replacing a stale socket (left by a killed server: dockerd would
    otherwise wait 15 s per call on it), but never one that another server answers on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        except OSError as e:
            raise AlreadyExists(f"cannot use {path}: {e.strerror}") from None
        else:
            raise AlreadyExists(f"another dm serve already answers on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock.bind(str(tmp))
    sock.listen(128)
    os.chmod(tmp, 0o660)
    os.rename(tmp, path)  # appears already listening: no refused connection in between
    return sock


def serve(home: Repo, path: Path, quiet: bool = False) -> None:
    """Answer on ``path`` until SIGTERM or SIGINT; then remove the socket."""
    import uvicorn  # noqa: PLC0415 - only the server needs it

    long_running()

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    sock = bind(path)
    volumes.empty_trash(home.root)  # what a killed server left
    plugin = Plugin(home, log)
    config = uvicorn.Config(plugin.app(), log_level="warning", access_log=False,
                            lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM after its shutdown, which would skip removing the socket.
    # (uvicorn types the method as returning a generator context manager: hence the ignore.)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(json.dumps({"serving": str(path), "home": str(home.root)}))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        plugin.worker.shutdown()
