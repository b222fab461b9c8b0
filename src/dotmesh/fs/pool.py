"""A btrfs pool in a file: where the filesystem under a store cannot snapshot, ``dm pool
create`` makes a btrfs filesystem in ``<store>/pool.img`` and mounts it through a loop device
on ``<store>/dots``, where every dot's folders live (as Dotmesh made a ZFS pool in a file).
Any later dm command mounts it again after a reboot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dotmesh.errors import Conflict, UsageError
from dotmesh.fs.btrfs import SnapshotError

IMAGE = "pool.img"
MOUNTED_ON = "dots"
MIN_SIZE = 256 << 20  # mkfs.btrfs's smallest useful filesystem, with room for metadata
MAX_SIZE = 1 << 60  # far beyond any disk; keeps sizes in what the kernel's calls take
_SIZE = re.compile(r"^([0-9]+)([KMGT]?)i?B?$", re.IGNORECASE)


class PoolError(SnapshotError):
    """The pool could not be made, mounted or grown."""


@dataclass(frozen=True)
class PoolInfo:
    image: Path
    mount: Path
    mounted: bool
    size: int  # bytes of the image file
    used: int | None  # bytes used in the filesystem, when mounted
    free: int | None


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1T`` or bytes: a size in bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"bad size {text!r}: use a number with K, M, G or T (e.g. 20G)")
    power: int = " KMGT".index((m.group(2) or " ").upper())
    size = int(m.group(1)) * int(1024**power)
    if size > MAX_SIZE:
        raise UsageError(f"size {text!r} is over the {MAX_SIZE >> 50} PiB a pool may have")
    return size


def _check_room(where: Path, more: int) -> None:
    """A pool's file is sparse: it takes disk as it fills. Refuse to promise more than the
    disk under it has free, or the pool's filesystem would fail writes it said had room."""
    free = shutil.disk_usage(where).free
    if more > free:
        raise UsageError(f"the disk under {where} has {free / 2**30:.1f} GiB free, less than "
                         f"the {more / 2**30:.1f} GiB asked for")


def image_of(root: Path) -> Path:
    return root / IMAGE


def mount_point(root: Path) -> Path:
    return root / MOUNTED_ON


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=300)
    except FileNotFoundError:
        raise PoolError(f"{cmd[0]} is missing (apt-get install btrfs-progs)") from None
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).replace("\\x0a", " ").rstrip(".")
        raise PoolError(f"{cmd[0]} failed: {why}")
    return done.stdout


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PoolError(f"{what} needs root (a loop device and a mount)")


def create(root: Path, size: int) -> PoolInfo:
    """Make the pool; refused where one exists or dots already have folders."""
    _need_root("dm pool create")
    if size < MIN_SIZE:
        raise UsageError(f"a pool needs at least {MIN_SIZE >> 20} MiB")
    image, mount = image_of(root), mount_point(root)
    if image.exists():
        raise Conflict(f"this store has a pool already ({image}): dm pool grow makes it bigger")
    if mount.is_dir() and any(mount.iterdir()):
        raise Conflict(f"{mount} holds dots' folders already: a pool is made before the first "
                       "dot (or in a new store, with --home)")
    mount.mkdir(parents=True, exist_ok=True, mode=0o711)
    _check_room(root, size)
    tmp = image.with_name(IMAGE + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)  # sparse: the file grows as the pool fills
        _run("mkfs.btrfs", "-q", "-f", str(tmp))
        os.rename(tmp, image)
    finally:
        tmp.unlink(missing_ok=True)
    ensure_mounted(root)
    os.chmod(mount, 0o711)
    return info(root)


def ensure_mounted(root: Path) -> bool:
    """Mount the store's pool if it has one that is not mounted; returns whether it has one."""
    image, mount = image_of(root), mount_point(root)
    if not image.exists():
        return False
    if os.path.ismount(mount):
        return True
    _need_root(f"mounting the store's pool {image}")
    mount.mkdir(exist_ok=True, mode=0o711)
    _run("mount", "-o", "loop", str(image), str(mount))
    try:  # no second page cache of the image's bytes: snapshots under writes commit faster
        _run("losetup", "--direct-io=on", _loop_device(image))
    except PoolError:
        pass  # a filesystem under the store without O_DIRECT: buffered, still correct
    return True


def info(root: Path) -> PoolInfo:
    image, mount = image_of(root), mount_point(root)
    if not image.exists():
        raise UsageError("this store has no pool: dm pool create --size 20G makes one")
    mounted = os.path.ismount(mount)
    usage = shutil.disk_usage(mount) if mounted else None
    return PoolInfo(image, mount, mounted, image.stat().st_size,
                    usage.used if usage else None, usage.free if usage else None)


def grow(root: Path, size: int) -> PoolInfo:
    """Make the pool ``size`` bytes (never smaller), online."""
    _need_root("dm pool grow")
    now = info(root)
    if size <= now.size:
        raise UsageError(f"the pool is {now.size / 2**30:.1f} GiB already; a pool only grows")
    ensure_mounted(root)
    _check_room(root, size - now.image.stat().st_blocks * 512)
    with open(now.image, "r+b") as f:
        f.truncate(size)
    device = _loop_device(now.image)
    _run("losetup", "-c", device)
    _run("btrfs", "filesystem", "resize", "max", str(now.mount))
    return info(root)


def _loop_device(image: Path) -> str:
    out = _run("losetup", "-j", str(image))
    for line in out.splitlines():
        return line.split(":", 1)[0]
    raise PoolError(f"no loop device holds {image}")
