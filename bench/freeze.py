#!/usr/bin/env python3
"""The freeze window of live commits: how long writers stay stopped, for a ~2 GiB dot.

    python bench/freeze.py [--small] [--commits 10]

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import workload  # noqa: E402

from tests.integration.servers import Postgres, Redis  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")
MiB = 1 << 20
PAGE_WRITER = """
import os, random, sys, time
files = sys.argv[1:]
fds = [os.open(f, os.O_WRONLY) for f in files]
sizes = [os.fstat(fd).st_size // 8192 for fd in fds]
rng = random.Random(5)
while True:
    i = rng.randrange(len(fds))
    os.pwrite(fds[i], rng.randbytes(8192), rng.randrange(sizes[i]) * 8192)
    time.sleep(0.0005)
"""


def dm(env: dict[str, str], *args: str) -> str:
    return subprocess.run([DM, *args], env=env, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="~100 MiB of cold data, 3 commits")
    ap.add_argument("--commits", type=int, default=None)
    args = ap.parse_args()
    size = (100 if args.small else 2048) * MiB
    commits = args.commits or (3 if args.small else 10)
    top = Path(tempfile.mkdtemp(prefix="dm-freeze-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    env = {**os.environ, "DM_HOME": str(top / "home"), "DM_AUTHOR": "bench"}
    procs: list[subprocess.Popen[bytes]] = []
    pg = redis = None
    try:
        dm(env, "init", "app")
        clicks, users, uploads, cold = (Path(dm(env, "path", f"app.{s}").strip())
                                        for s in ("clicks-db", "users-db", "uploads", "data"))
        os.chmod(top / "home", 0o755)
        print(f"bench: generating {size // MiB} MiB of data in the dot", flush=True)
        workload.generate(cold, size)
        pg = Postgres(users, top / "pgsock", 54340)
        pg.initdb()
        pg.start()
        redis = Redis(clicks, top / "redis.sock")
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
                procs.append(subprocess.Popen([sys.executable, "-c", PAGE_WRITER, *heaps],
                                              cwd=cold, stdin=subprocess.DEVNULL))
            freezes = []
            for _ in range(commits):
                time.sleep(random.uniform(0.2, 0.5))
                out = json.loads(dm(env, "commit", "-m", pattern, "--json"))
                freezes.append(out["freeze_ms"])
            results[pattern] = freezes
            print(f"bench: {pattern}: {freezes}", flush=True)
        print(f"\n| write pattern ({size // MiB} MiB dot, {commits} commits) | freeze median ms "
              "| freeze max ms | target median <= 100, max <= 250 |")
        print("|---|---|---|---|")
        for pattern, f in results.items():
            med, mx = statistics.median(f), max(f)
            ok = "yes" if med <= 100 and mx <= 250 else "**MISSED**"
            print(f"| {pattern} | {med:.1f} | {mx:.1f} | {ok} |")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if redis:
            redis.stop()
        if pg:
            pg.stop()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
