"""The app's servers, as a fixture the dotmesh marker starts once the state is in place."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dotmesh

import mobycounter


@pytest.fixture
def app_servers(dotmesh_repo: dotmesh.Repo) -> Iterator[mobycounter.App]:
    """PostgreSQL and Redis on the dot's folders: on the state the test is pinned to."""
    with mobycounter.servers(dotmesh_repo.dot("app")) as app:
        yield app
