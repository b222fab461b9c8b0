"""What every command module shares: the store it works on, and common options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from dotmesh.api import Dot, Repo
    from dotmesh.store.repo import Repo as Store

json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class Ctx:
    """The store named by --home or DM_HOME, opened on first use through the Python API,
    which the commands use: what a command does, a script can do the same way."""

    def __init__(self, home: Path | None) -> None:
        self._path = home  # None: the default, found on first use
        self._repo: Repo | None = None

    @property
    def path(self) -> Path:
        """The store's folder: --home, else $DM_HOME, else the default (store/repo.py)."""
        if self._path is None:
            from dotmesh.store.repo import default_home  # not for --help and the hub's commands

            self._path = default_home()
        return self._path

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    @property
    def repo(self) -> Repo:
        if self._repo is None:
            from dotmesh.api import Repo  # the store's code, only for commands that use it

            if not is_store(self.path) and not _makes_a_store():
                raise _no_store(self.path)
            self._repo = Repo.open(self.path)
            # One command, then the store is closed: folders it threw away are reaped then
            self._repo._store.reap_at_close = True  # noqa: SLF001 - one package
        return self._repo

    @property
    def home(self) -> Store:
        """The store itself, for the servers (dm serve, dm daemon) that run on it: they
        reap what each operation threw away when it ends, not at their close."""
        store = self.repo._store  # noqa: SLF001 - one package
        store.reap_at_close = False
        return store

    def dot(self, name: str | None = None) -> Dot:
        """The dot ``name`` (default: the current one)."""
        return self.repo.current_or(name)


# The one command that makes a store where there is none. Any other command on a missing
# store (a mistyped --home or DM_HOME) says so, names the store probably meant, makes nothing.
MAKERS = {("init",)}


def is_store(path: Path) -> bool:
    """A store, whole or not: one that lost its index is still one (dm fsck --repair)."""
    return any((path / name).exists() for name in ("meta.db", "packs", "dots"))


def _makes_a_store() -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True  # not a command (the Python API, a test): as asked
    path = tuple(ctx.command_path.split()[1:])
    return any(path[:len(m)] == m for m in MAKERS)


def _no_store(path: Path) -> Exception:
    import difflib

    from dotmesh.errors import NotFound

    near: list[str] = []
    try:
        stores = [str(p) for p in path.parent.iterdir() if (p / "meta.db").exists()]
        near = difflib.get_close_matches(str(path), stores, n=1)  # (whole ones only)
    except OSError:
        pass
    hint = f"did you mean {near[0]}? " if near else ""
    return NotFound(f"no dotmesh store at {path} ({hint}dm init makes one there)")


pass_ctx = click.make_pass_decorator(Ctx)
