#!/usr/bin/env python3
"""The freeze window of live commits: how long writers stay stopped, for a ~2 GiB dot.

    python bench/freeze.py [--small] [--commits 10] [--fs ext4,btrfs]

Each measurement runs twice, one store after the other: on the scratch folder's ext4 (plain
folders: inotify-guided passes, then a short final one in the freeze) and on a btrfs loop device
(the btrfs backend: the freeze covers only the read-only snapshots of the subdots).

The dot holds the polyglot dataset (bench/workload.py) plus real PostgreSQL and Redis servers
driven by the demo's app (demo/miniapp.py), which never stops writing. Two write patterns:

- app: only the app writes (PostgreSQL heap, index and WAL, the Redis AOF, new uploads);
  the rest of the dot is cold data, as in most real dots.
- app + scattered pages: a second writer also rewrites random 8 KiB pages all over the big
  database-like files, the worst case for a file-level capture.

inotify names what changed since the pre-copy, so the freeze re-reads only those files: its
length follows the size of the files written meanwhile, not the size of the dot. Needs root,
PostgreSQL and Redis (scripts/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import workload  # noqa: E402

from tests.integration.servers import Postgres, Redis  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")
MiB = 1 << 20


def dm(env: dict[str, str], *args: str) -> str:
    return subprocess.run([DM, *args], env=env, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).stdout


def measure(home: Path, run_dir: Path, size: int, commits: int) -> dict[str, list[float]]:
    """The freeze windows of ``commits`` live commits per write pattern, for a store at
    ``home``; ``run_dir`` holds the servers' sockets."""
    env = {**os.environ, "DM_HOME": str(home), "DM_AUTHOR": "bench"}
    procs: list[subprocess.Popen[bytes]] = []
    pg = redis = None
    try:
        dm(env, "init", "app")
        backend = json.loads(dm(env, "version", "--json"))["backend"]
        clicks, users, uploads, cold = (Path(dm(env, "path", f"app.{s}").strip())
                                        for s in ("clicks-db", "users-db", "uploads", "data"))
        os.chmod(home, 0o755)
        print(f"bench: {backend} backend: generating {size // MiB} MiB of data in the dot",
              flush=True)
        workload.generate(cold, size)
        pg = Postgres(users, run_dir / "pgsock", 54340)
        pg.initdb()
        pg.start()
        redis = Redis(clicks, run_dir / "redis.sock")
        redis.start()
        pg.sql("CREATE TABLE steps (n int PRIMARY KEY, payload text)")
        pg.sql("CREATE INDEX ON steps (payload)")
        app_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "demo" / "miniapp.py"), str(pg.sock), str(pg.port),
             str(redis.sock), str(uploads)], env=app_env, stdin=subprocess.DEVNULL))
        dm(env, "commit", "-m", "first copy")  # the first commit stores everything
        results: dict[str, list[float]] = {}
        for pattern in ("app", "app + scattered pages"):
            if pattern != "app":
                heaps = sorted(str(p) for p in (cold / "pg").iterdir())
                procs.append(subprocess.Popen([sys.executable, "-c", workload.PAGE_WRITER,
                                               *heaps], cwd=cold, stdin=subprocess.DEVNULL))
            freezes = []
            for _ in range(commits):
                time.sleep(random.uniform(0.2, 0.5))
                out = json.loads(dm(env, "commit", "-m", pattern, "--json"))
                freezes.append(out["freeze_ms"])
            results[pattern] = freezes
            print(f"bench: {backend}: {pattern}: {freezes}", flush=True)
        return results
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if redis:
            redis.stop()
        if pg:
            pg.stop()


# median and max freeze window, ms: issue 4's for plain folders, issue 12's for btrfs
LIMITS = {"ext4": (100.0, 250.0), "btrfs": (10.0, 25.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="~100 MiB of cold data, 3 commits")
    ap.add_argument("--commits", type=int, default=None)
    ap.add_argument("--fs", default="ext4,btrfs",
                    help="where the store lives, in turn: ext4 (the scratch folder, so plain "
                         "folders) and/or btrfs (a loop device, so the btrfs backend)")
    args = ap.parse_args()
    size = (100 if args.small else 2048) * MiB
    commits = args.commits or (3 if args.small else 10)
    top = Path(tempfile.mkdtemp(prefix="dm-freeze-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for fs in args.fs.split(","):
            run_dir = top / f"run-{fs}"
            run_dir.mkdir(mode=0o755)
            if fs == "btrfs":
                with btrfs_loop(top, size * 3 + (1 << 30)) as mnt:
                    results[fs] = measure(mnt / "home", run_dir, size, commits)
            else:
                results[fs] = measure(top / "home", run_dir, size, commits)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"\n| store on | write pattern ({size // MiB} MiB dot, {commits} commits) "
          "| freeze median ms | freeze max ms | target |")
    print("|---|---|---|---|---|")
    for fs, by_pattern in results.items():
        lim_med, lim_max = LIMITS.get(fs, LIMITS["ext4"])
        for pattern, f in by_pattern.items():
            med, mx = statistics.median(f), max(f)
            ok = "met" if med <= lim_med and mx <= lim_max else "**MISSED**"
            print(f"| {fs} | {pattern} | {med:.1f} | {mx:.1f} | median <= {lim_med:.0f}, "
                  f"max <= {lim_max:.0f}: {ok} |")


@contextmanager
def btrfs_loop(top: Path, size: int) -> Iterator[Path]:
    """A fresh btrfs in a sparse file under ``top``, mounted through a loop device."""
    image, mnt = top / "btrfs.img", top / "btrfs"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        os.chmod(mnt, 0o755)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
