"""What every command module shares: the store it works on, and common options."""

from __future__ import annotations

from pathlib import Path

import click

from dotmesh.store.repo import Repo

json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class Ctx:
    """The store named by --home or DM_HOME, opened on first use."""

    def __init__(self, home: Path) -> None:
        self.path = home
        self._home: Repo | None = None

    def close(self) -> None:
        if self._home is not None:
            self._home.close()
            self._home = None

    @property
    def home(self) -> Repo:
        if self._home is None:
            self._home = Repo(self.path)
        return self._home


pass_ctx = click.make_pass_decorator(Ctx)
