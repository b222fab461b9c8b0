"""Servers shared by several test modules, started once per run."""

from __future__ import annotations

import pytest

from tests.integration.remote_env import seaweedfs


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on loopback."""
    with seaweedfs() as server:
        yield server
