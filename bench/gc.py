#!/usr/bin/env python3
"""dm gc and dm du on stores with history (issue 13).

    python bench/gc.py --small       # ~50 MiB, 100 commits: proves the harness (CI runs it)
    python bench/gc.py               # 2 GiB with 20 commits; 1,000 small commits

Scenarios:
1. A dot of the polyglot dataset (bench/workload.py) with 20 commits, each after the 1%
   database-like change: 10 on master, then 10 on a branch. The branch is deleted (-D), the
   reflog expired and `dm gc` run: wall time, peak memory, the bytes it freed against what
   `dm du` said only that branch held (target: within 5%).
2. A small dot with 1,000 commits: `dm gc` with nothing to do (target <= 2 s), and `dm du`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")


def run(env: dict[str, str], *args: str) -> tuple[str, float]:
    """A dm command's output and wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run([DM, *args], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"bench: dm {' '.join(args)} failed ({p.returncode}): "
                         f"{p.stderr.strip()}")
    return p.stdout, time.perf_counter() - t0


def measured(env: dict[str, str], *args: str) -> tuple[str, float, float]:
    """Like :func:`run`, with the peak resident memory of the command."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([DM, *args], env=env, stdout=out, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench: dm {' '.join(args)} failed: {err.strip()}")
        out.seek(0)
        return out.read().decode(), wall, ru.ru_maxrss / 1024


def history_store(work: Path, total: int, commits: int) -> tuple[dict[str, str], int]:
    """Scenario 1: returns the store's env and what dm du says the branch alone holds."""
    env = {**os.environ, "DM_HOME": str(work / "home"), "DM_AUTHOR": "bench"}
    run(env, "init", "app")
    folder = Path(run(env, "path", "app")[0].strip())
    workload.generate(folder, total)
    run(env, "commit", "-m", "initial")
    for i in range(1, commits):
        if i == commits // 2:
            run(env, "checkout", "-b", "doomed")
        workload.modify(folder, total, seed=100 + i)
        run(env, "commit", "-m", f"change {i}")
    run(env, "checkout", "master")
    du = json.loads(run(env, "du", "--no-gc", "--json")[0])
    doomed = [b for b in du["dots"][0]["branches"] if b["name"] == "doomed"][0]
    return env, int(doomed["unique"])


def many_commits(work: Path, commits: int) -> dict[str, str]:
    """Scenario 2: a small dot with ``commits`` commits, made in one process (fast)."""
    env = {**os.environ, "DM_HOME": str(work / "many"), "DM_AUTHOR": "bench"}
    run(env, "init", "small")
    folder = Path(run(env, "path", "small")[0].strip())
    code = f"""
import os, sys
from pathlib import Path
from dotmesh.store.repo import Repo
from dotmesh.ops import commit
home = Repo(Path({str(work / 'many')!r}))
folder = Path({str(folder)!r})
for i in range({commits}):
    (folder / f"f{{i % 50}}").write_bytes(os.urandom(2000) + str(i).encode())
    commit.commit(home, "small", f"c{{i}}")
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--size-mib", type=int, default=None,
                    help="the history's dataset (default: 48 with --small, else 2048)")
    args = ap.parse_args()
    total = (args.size_mib or (48 if args.small else 2048)) << 20
    many = 100 if args.small else 1000
    results: dict[str, object] = {"size": total}
    with tempfile.TemporaryDirectory(prefix="dm-gc-bench-") as tmp:
        work = Path(tmp)
        env, expected = history_store(work, total, 20)
        packs = work / "home" / "packs"
        before = sum(p.stat().st_size for p in packs.iterdir())
        run(env, "branch", "-D", "doomed")
        run(env, "reflog", "expire", "--days", "0")
        out, wall, rss = measured(env, "gc", "--json")
        after = sum(p.stat().st_size for p in packs.iterdir())
        freed = before - after
        results["gc after deleting half"] = {
            "wall_s": round(wall, 3), "peak_mib": round(rss, 1), "freed": freed,
            "expected": expected,
            "freed/expected": round(freed / expected, 4) if expected else None,
            "stored_before": before, "stored_after": after}
        check = json.loads(run(env, "fsck", "--json")[0])
        if not check["ok"]:
            raise SystemExit(f"bench: fsck after gc: {check}")
        env2 = many_commits(work, many)
        measured(env2, "gc")  # the first run may find a little to do
        _, wall2, rss2 = measured(env2, "gc", "--json")
        _, wall3, rss3 = measured(env2, "du", "--json")
        results[f"gc with nothing to do, {many} commits"] = {"wall_s": round(wall2, 3),
                                                             "peak_mib": round(rss2, 1)}
        results[f"du, {many} commits"] = {"wall_s": round(wall3, 3), "peak_mib": round(rss3, 1)}
    print(json.dumps(results, indent=2))
    g = results["gc after deleting half"]
    assert isinstance(g, dict)
    ratio = g["freed/expected"]
    print(f"target: freed within 5% of expected: {ratio} "
          f"({'met' if ratio and abs(ratio - 1) <= 0.05 else 'MISSED'})")
    print(f"target: gc with nothing to do <= 2 s: {wall2:.2f} s "
          f"({'met' if wall2 <= 2 else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
