"""Servers shared by several test modules, started once per run."""

from __future__ import annotations

import pytest

from tests.integration.remote_env import postgres_server, seaweedfs


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on loopback."""
    with seaweedfs() as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on a unix socket, for hubs: each takes a database of its own
    (``remote_env.postgres_db``)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def btrfs_mount():
    """A btrfs filesystem on a loop device, shared by the tests that need one."""
    from tests.integration.cow_env import loop_filesystem

    with loop_filesystem("btrfs") as mount:
        yield mount


@pytest.fixture(scope="session")
def xfs_mount():
    """An XFS filesystem with reflinks on a loop device."""
    from tests.integration.cow_env import loop_filesystem

    with loop_filesystem("xfs") as mount:
        yield mount
