"""Containers that use a dot through the ``dm`` volume driver, from the Docker engine's API.

Which engine: ``DOCKER_HOST`` (as the docker command reads it), else the local socket. No
engine, or one that does not answer, means no containers: a dot used only by host processes
must not wait for Docker. The SDK is imported only when an engine socket exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dotmesh.errors import DotmeshError, InvalidName
from dotmesh.model.names import DockerVolume

DRIVER = "dm"  # the plugin's name: its socket is /run/docker/plugins/dm.sock


def driver() -> str:
    """The volume driver whose volumes are this store's: ``$DM_DRIVER``, else ``dm``. A second
    engine beside the first (another store, ``dm serve --socket .../NAME.sock``) is driver
    NAME; its store's commands find their containers with DM_DRIVER=NAME."""
    return os.environ.get("DM_DRIVER") or DRIVER
API_TIMEOUT = 10  # seconds per request; docker-py adds a stop's own timeout


class EngineError(DotmeshError):
    """The Docker engine refused or failed a request about the dot's containers."""

    exit_code = 10


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    state: str  # running, paused, exited, created...
    volumes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return f"container {self.name}"


def engine_url() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _client() -> Any | None:
    url = engine_url()
    if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
        return None
    import docker  # noqa: PLC0415 - 150 ms of imports, only when an engine may exist

    try:
        return docker.DockerClient(base_url=url, timeout=API_TIMEOUT)
    except docker.errors.DockerException:
        return None


def containers_using(dots: Iterable[str]) -> dict[str, list[Container]]:
    """The containers (any state) that mount a volume of each dot (of driver ``dm``, or
    ``$DM_DRIVER``), by dot."""
    wanted = set(dots)
    out: dict[str, list[Container]] = {d: [] for d in wanted}
    client = _client()
    if client is None or not wanted:
        return out
    import docker  # noqa: PLC0415

    try:
        listed = client.api.containers(all=True)
    except (docker.errors.DockerException, OSError):
        return out  # no engine answering: nothing runs there
    finally:
        client.close()
    ours = driver()
    for c in listed:
        names: dict[str, list[str]] = {}
        for m in c.get("Mounts") or []:
            if m.get("Type") != "volume" or m.get("Driver") != ours:
                continue
            try:
                vol = DockerVolume.parse(m.get("Name", ""))
            except InvalidName:
                continue
            if vol.dot in wanted:
                names.setdefault(vol.dot, []).append(m["Name"])
        for dot, vols in names.items():
            name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
            out[dot].append(Container(c["Id"], name, c.get("State", "?"), tuple(sorted(vols))))
    for found in out.values():
        found.sort(key=lambda x: x.name)
    return out


def _each(containers: list[Container], action: str,
          call: Callable[[Any, Container], None]) -> None:
    """Run ``call`` for every container at once; raise one EngineError naming the failures."""
    if not containers:
        return
    client = _client()
    if client is None:
        raise EngineError(f"cannot {action} {', '.join(map(str, containers))}: no Docker "
                          f"engine at {engine_url()}")
    from concurrent.futures import ThreadPoolExecutor

    import docker  # noqa: PLC0415

    def one(c: Container) -> str | None:
        try:
            call(client, c)
        except (docker.errors.DockerException, OSError) as e:
            return f"{c}: {getattr(e, 'explanation', None) or e}"
        return None

    try:
        with ThreadPoolExecutor(max(1, min(8, len(containers)))) as pool:
            failed = [f for f in pool.map(one, containers) if f]
    finally:
        client.close()
    if failed:
        raise EngineError(f"could not {action} " + "; ".join(failed))


def pause(containers: list[Container]) -> None:
    _each(containers, "pause", lambda cl, c: cl.api.pause(c.id))


def unpause(containers: list[Container]) -> None:
    _each(containers, "unpause", lambda cl, c: cl.api.unpause(c.id))


def stop(containers: list[Container], timeout: int) -> None:
    _each(containers, "stop", lambda cl, c: cl.api.stop(c.id, timeout=timeout))


def start(containers: list[Container]) -> None:
    _each(containers, "start", lambda cl, c: cl.api.start(c.id))
