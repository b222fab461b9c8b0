"""Copy-on-write filesystems for tests: btrfs made in a file and mounted through a loop device,
as CI (root) can."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _kernel_has(fs: str) -> bool:
    if fs in Path("/proc/filesystems").read_text():
        return True
    subprocess.run(["modprobe", fs], capture_output=True)
    return fs in Path("/proc/filesystems").read_text()


@contextmanager
def loop_filesystem(fs: str, size: str = "3G") -> Iterator[Path]:
    """A fresh ``fs`` filesystem of ``size`` (sparse) mounted on a temporary folder."""
    if os.geteuid() != 0:
        raise AssertionError("the copy-on-write tests need root (loop devices, mount)")
    if not _kernel_has(fs):
        pytest.skip(f"this kernel has no {fs} filesystem")
    mkfs = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}
    if not shutil.which(mkfs[fs][0]):
        raise AssertionError(f"{mkfs[fs][0]} is missing: bash scripts/setup.sh installs it")
    top = Path(tempfile.mkdtemp(prefix=f"dm-{fs}-", dir="/var/tmp"))
    image, mount = top / "fs.img", top / "mnt"
    mount.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run([*mkfs[fs], str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)
