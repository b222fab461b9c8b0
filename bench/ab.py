#!/usr/bin/env python3
"""Two builds of dm on the same workload, interleaved: is a change slower?

    python bench/ab.py OLD_DM NEW_DM                 # 2 GiB, 3 rounds
    python bench/ab.py OLD_DM NEW_DM --size-mib 256 --rounds 1

OLD_DM and NEW_DM are dm commands (e.g. the .venv/bin/dm of a worktree at an older commit).
Each round runs dotmesh's steps of bench/run.py (initial commit, no-change commit, commit
after a 1% change, full restore by checkout -b, reset --hard to the first commit over a
modified state, and a no-change commit of many small files) for both builds, the order of
the builds alternating, and prints NEW/OLD per step: median and [min-max] over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from run import Sample, measure, sh  # noqa: E402

STEPS = ("1 initial commit", "2 no-change commit", "3 commit after 1% change",
         "5 full restore (checkout -b)", "6 reset --hard to the first commit",
         "7 no-change commit of many files")


def one(dm: str, pristine: Path, many: Path, work: Path, size: int) -> dict[str, Sample]:
    env = {**os.environ, "DM_HOME": str(work / "home"), "DM_AUTHOR": "bench"}
    out: dict[str, Sample] = {}
    sh(dm, "init", "app", env=env)
    folder = Path(subprocess.run([dm, "path", "app"], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip())
    os.rmdir(folder)
    sh("cp", "-a", str(pristine), str(folder))
    subprocess.run(["sync"])
    time.sleep(0.2)  # outside the racy-stat window
    out[STEPS[0]] = measure([dm, "commit", "-m", "s1"], env=env)
    time.sleep(0.2)
    out[STEPS[1]] = measure([dm, "commit", "-m", "s2"], env=env)
    workload.modify(folder, size)
    time.sleep(0.2)
    out[STEPS[2]] = measure([dm, "commit", "-m", "s3"], env=env)
    out[STEPS[3]] = measure([dm, "checkout", "-b", "restored"], env=env)
    sh(dm, "checkout", "master", env=env)
    first = json.loads(subprocess.run([dm, "log", "--json"], env=env, capture_output=True,
                                      text=True, check=True).stdout)[-1]["id"]
    workload.modify(folder, size, seed=11)
    time.sleep(0.2)
    out[STEPS[4]] = measure([dm, "reset", "--hard", first], env=env)
    if workload.dir_bytes(folder) != workload.dir_bytes(pristine):
        raise SystemExit(f"bench: {dm} reset did not restore the first commit")
    many_env = {**env, "DM_HOME": str(work / "many")}
    sh(dm, "init", "many", env=many_env)
    many_dir = Path(subprocess.run([dm, "path", "many"], env=many_env, capture_output=True,
                                   text=True, check=True).stdout.strip())
    os.rmdir(many_dir)
    sh("cp", "-a", str(many), str(many_dir))
    sh(dm, "commit", "-m", "all", env=many_env)
    time.sleep(0.2)
    out[STEPS[5]] = measure([dm, "commit", "-m", "again"], env=many_env)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many-files", type=int, default=200_000)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    size = args.size_mib << 20
    top = Path(tempfile.mkdtemp(prefix="dm-ab-", dir=args.workdir))
    try:
        pristine, many = top / "pristine", top / "many-src"
        workload.generate(pristine, size)
        workload.many_files(many, args.many_files)
        ratios: dict[str, list[float]] = {s: [] for s in STEPS}
        rss: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            got = {}
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                work = top / f"{which}-{r}"
                work.mkdir()
                got[which] = one(getattr(args, which), pristine, many, work, size)
                rss[which].append(max(s.rss_mib for s in got[which].values()))
                shutil.rmtree(work)
            for s in STEPS:
                ratios[s].append(got["new"][s].wall / max(got["old"][s].wall, 1e-6))
                print(f"round {r + 1}: {s}: old {got['old'][s].wall:.2f} s, new "
                      f"{got['new'][s].wall:.2f} s", flush=True)
        print("\n| step | new/old wall, median [min-max] |\n|---|---|")
        for s in STEPS:
            v = ratios[s]
            print(f"| {s} | {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}] |")
        print(f"| peak memory, MiB | old {max(rss['old']):.0f}, new {max(rss['new']):.0f} |")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
