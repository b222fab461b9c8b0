"""``dm pool``: a btrfs filesystem in a file for a store whose disk cannot snapshot."""

from __future__ import annotations

from dotmesh.errors import Conflict
from dotmesh.fs import pool
from dotmesh.fs.pool import PoolInfo
from dotmesh.store.repo import Repo
from dotmesh.workdir.branches import choose


def create(home: Repo, size: int) -> PoolInfo:
    """Make the pool, and make the store use the btrfs backend on it."""
    if pool.image_of(home.root).exists():
        raise Conflict(f"this store has a pool already ({pool.image_of(home.root)}): "
                       "dm pool grow makes it bigger")
    if home.dots():
        raise Conflict("this store has dots already: a pool is made before the first dot "
                       "(or in a new store, with --home)")
    made = pool.create(home.root, size)
    choose(home, "btrfs")
    return made


def show(home: Repo) -> PoolInfo:
    return pool.info(home.root)


def grow(home: Repo, size: int) -> PoolInfo:
    return pool.grow(home.root, size)
