#!/usr/bin/env python3
"""The cost of ``with dot.at("state-a"):`` around one test (issue 16), against doing the same
by hand, on the polyglot dataset with a 1% difference between the two states.

    sudo .venv/bin/python bench/pin.py --small   # ~48 MiB, plain and btrfs: seconds (CI)
    sudo .venv/bin/python bench/pin.py           # ~2 GiB: a few minutes

For each backend (plain folders on the scratch folder's filesystem; btrfs on a loop device),
a dot holds state-a (the dataset) and state-b (after the 1% modification), and the working
state is state-b. Measured, in one Python process as the pytest plugin runs it: entering
``at("state-a")`` (the working state becomes state-a), leaving it (state-b comes back, and
the branch's head), and both together; medians over rounds. The peer is what a test suite
does without dotmesh: keep a copy of each state and ``rsync -a --delete`` the wanted one over
the folder, then the other back (plain); on btrfs, swap in a writable snapshot of a read-only
one and back. Ratios are dm / peer within the run.
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
from run import DM, LoopFs, same_tree  # noqa: E402

from dotmesh import Repo  # noqa: E402


def prepared(home: Path, total: int) -> tuple[dict[str, str], Path]:
    """A store at ``home`` whose dot has state-a and state-b (the working state)."""
    env = {**os.environ, "DM_HOME": str(home), "DM_AUTHOR": "bench"}

    def dm(*args: str) -> str:
        return subprocess.run([DM, *args], env=env, capture_output=True, text=True, check=True,
                              stdin=subprocess.DEVNULL).stdout

    dm("init", "app")
    folder = Path(dm("path", "app").strip())
    workload.generate(folder, total)
    dm("commit", "-m", "state a")
    dm("tag", "state-a")
    workload.modify(folder, total, seed=11)
    dm("commit", "-m", "state b")
    dm("tag", "state-b")
    return env, folder


def time_at(home: Path, folder: Path, rounds: int, check_a: Path | None) -> dict[str, float]:
    enter, leave, both = [], [], []
    with Repo.open(home) as repo:
        app = repo.dot("app")
        head = app.head
        for _ in range(rounds):
            t0 = time.perf_counter()
            with app.at("state-a"):
                t1 = time.perf_counter()
                if check_a is not None and not same_tree(folder, check_a):
                    raise SystemExit("bench: at('state-a') did not give state a")
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            enter.append(t1 - t0)
            leave.append(t3 - t2)
            both.append((t1 - t0) + (t3 - t2))
            if app.head != head:
                raise SystemExit("bench: the head did not come back")
    return {"enter_s": statistics.median(enter), "leave_s": statistics.median(leave),
            "at_s": statistics.median(both)}


def time_rsync(folder: Path, copy_a: Path, copy_b: Path, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for src in (copy_a, copy_b):
            subprocess.run(["rsync", "-a", "--delete", f"{src}/", f"{folder}/"], check=True)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def time_btrfs_swap(mnt: Path, rounds: int) -> float:
    """A test suite's own btrfs rollback: the folder is a writable snapshot of state a, then
    of state b again (delete, snapshot), both read-only snapshots kept aside."""
    out = []
    live = mnt / "live"
    for _ in range(rounds):
        t0 = time.perf_counter()
        for src in (mnt / "snap-a", mnt / "snap-b"):
            subprocess.run(["btrfs", "subvolume", "delete", "-c", str(live)], check=True,
                           capture_output=True)
            subprocess.run(["btrfs", "subvolume", "snapshot", str(src), str(live)], check=True,
                           capture_output=True)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    total = (48 << 20) if args.small else (2 << 30)
    results: dict[str, object] = {"size": total, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="dm-pin-bench-") as tmp:
        work = Path(tmp)
        # plain folders, against rsync of kept copies
        env, folder = prepared(work / "plain", total)
        copy_b = work / "copy-b"
        shutil.copytree(folder, copy_b, symlinks=True)
        subprocess.run([DM, "export", "state-a", str(work / "export-a")], env=env, check=True)
        copy_a = work / "export-a" / "__default__"
        dm_plain = time_at(work / "plain", folder, args.rounds, copy_a)
        peer = time_rsync(folder, copy_a, copy_b, args.rounds)
        results["plain"] = {**{k: round(v, 3) for k, v in dm_plain.items()},
                            "rsync_s": round(peer, 3),
                            "ratio": round(dm_plain["at_s"] / peer, 2)}
        shutil.rmtree(work / "plain")
        # btrfs, against a hand-made subvolume swap
        print(f"plain: {json.dumps(results['plain'])}", flush=True)
        # the store (folders and packs), the peer's folder, rsync's copies beside its files
        # and the snapshots holding what they replaced
        fs = LoopFs(work, 6 * total + (2 << 30), "btrfs")
        try:
            home = fs.mnt / "home"
            env, folder = prepared(home, total)
            dm_cow = time_at(home, folder, args.rounds, None)
            subprocess.run(["btrfs", "subvolume", "create", str(fs.mnt / "live")], check=True,
                           capture_output=True)
            subprocess.run(["cp", "-a", f"{copy_a}/.", str(fs.mnt / "live")],
                           check=True)
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(fs.mnt / "live"),
                            str(fs.mnt / "snap-a")], check=True, capture_output=True)
            subprocess.run(["rsync", "-a", "--inplace", "--delete", f"{copy_b}/",
                            f"{fs.mnt / 'live'}/"],
                           check=True)
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(fs.mnt / "live"),
                            str(fs.mnt / "snap-b")], check=True, capture_output=True)
            peer = time_btrfs_swap(fs.mnt, args.rounds)
            results["btrfs"] = {**{k: round(v, 3) for k, v in dm_cow.items()},
                                "subvolume_swap_s": round(peer, 3),
                                "ratio": round(dm_cow["at_s"] / peer, 2)}
        finally:
            fs.close()
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    for backend in ("plain", "btrfs"):
        r = results[backend]
        assert isinstance(r, dict)
        print(f"{backend}: dot.at() around one test {r['at_s']:.3f} s (enter {r['enter_s']:.3f}"
              f" s, leave {r['leave_s']:.3f} s); dm/peer {r['ratio']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
