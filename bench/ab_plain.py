#!/usr/bin/env python3
"""First commit and full restore on the plain backend for two source trees, interleaved, with
restic alongside in each round (issue 14).

    python bench/ab_plain.py OLD_SRC NEW_SRC [MORE_SRC...] --size-mib 1024 --rounds 3 [--restic]

Each SRC is a ``src`` folder of dotmesh (with its compiled extensions built, e.g. a copy of a
worktree's ``src`` after ``pip install -e``), named A, B, C... in the output; all run with this
Python, in process (``DM_DAEMON=off``). Each round runs, for every build (the order rotating
between rounds): ``dm commit`` of the whole dataset, then ``dm checkout -b`` of a new branch (which
builds its folders from the store); with ``--restic``, ``restic backup`` and ``restic restore``
of the same data in the same round. Prints wall s, CPU s and peak MiB per step and build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from run import Sample, measure, sh  # noqa: E402

LAUNCH = "import sys\nfrom dotmesh.cli.launch import main\nsys.exit(main())\n"


def dm_round(src: Path, pristine: Path, work: Path) -> dict[str, Sample]:
    launcher = work / "dm.py"
    launcher.write_text(LAUNCH)
    env = {**os.environ, "DM_HOME": str(work / "home"), "DM_AUTHOR": "bench",
           "DM_DAEMON": "off", "PYTHONPATH": str(src)}
    dm = [sys.executable, str(launcher)]
    sh(*dm, "init", "app", env=env)
    folder = Path(subprocess.run([*dm, "path", "app"], env=env, capture_output=True,
                                 text=True, check=True).stdout.strip())
    os.rmdir(folder)
    sh("cp", "-a", str(pristine), str(folder))
    subprocess.run(["sync"], check=True)
    time.sleep(0.3)
    out = {"commit": measure([*dm, "commit", "-m", "s1"], env=env)}
    subprocess.run(["sync"], check=True)
    out["checkout -b"] = measure([*dm, "checkout", "-b", "restored"], env=env)
    got = Path(subprocess.run([*dm, "path", "app"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip())
    if workload.dir_bytes(got) != workload.dir_bytes(pristine):
        raise SystemExit(f"bench: {src}: the restored folder differs")
    return out


def restic_round(pristine: Path, work: Path) -> dict[str, Sample]:
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "rc")}
    restic = ["restic", "-r", str(work / "repo"), "--quiet"]
    subprocess.run(["sync"], check=True)
    out = {"commit": measure([*restic, "init"], [*restic, "backup", str(pristine)], env=env)}
    subprocess.run(["sync"], check=True)
    out["checkout -b"] = measure([*restic, "restore", "latest", "--target", str(work / "out")],
                                 env=env)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, nargs="+")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--restic", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dm-ab-", dir=args.workdir))
    try:
        pristine = root / "data"
        workload.generate(pristine, args.size_mib << 20)
        rows: list[tuple[int, str, str, Sample]] = []
        for r in range(args.rounds):
            builds = [(chr(ord("A") + i), src) for i, src in enumerate(args.src)]
            if args.restic:
                builds.append(("restic", Path()))
            k = r % len(builds)
            order = builds[k:] + builds[:k]
            for name, src in order:
                work = root / f"{name}-{r}"
                work.mkdir()
                got = restic_round(pristine, work) if name == "restic" else \
                    dm_round(src, pristine, work)
                for step, s in got.items():
                    rows.append((r, name, step, s))
                    print(f"round {r} {name:6} {step:12} wall {s.wall:6.2f} s  cpu {s.cpu:6.2f}"
                          f" s  peak {s.rss_mib:6.1f} MiB", flush=True)
                shutil.rmtree(work)
        print()
        for step in ("commit", "checkout -b"):
            for name in [chr(ord("A") + i) for i in range(len(args.src))] + ["restic"]:
                w = sorted(s.wall for _, n, st, s in rows if n == name and st == step)
                if w:
                    peak = max(s.rss_mib for _, n, st, s in rows if n == name and st == step)
                    print(f"{step:12} {name:6} wall {w[0]:.2f}-{w[-1]:.2f} s "
                          f"(median {w[len(w) // 2]:.2f})  peak {peak:.0f} MiB")
            if args.restic:
                for name in [chr(ord("A") + i) for i in range(len(args.src))]:
                    rat = sorted(
                        s.wall / next(t.wall for rr, n, st, t in rows
                                      if rr == r and n == "restic" and st == step)
                        for r, n, st, s in rows if n == name and st == step)
                    print(f"{step:12} {name}/restic {rat[0]:.2f}-{rat[-1]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
