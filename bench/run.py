#!/usr/bin/env python3
"""Benchmark dotmesh against restic, borg, cp and btrfs on the same data, in one run.

    python bench/run.py --small            # ~100 MiB, one run: proves the harness (CI)
    python bench/run.py                    # ~2 GiB, 3 runs: the real measurement

Each scenario runs every tool back to back, in an order that rotates between runs, and ratios are
computed pair by pair within a run. Needs root (btrfs on a loop device); installs restic,
borgbackup and btrfs-progs from Debian if they are missing.
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
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")
MiB = 1 << 20


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mib: float
    stored: int | None = None


def sh(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def measure(*cmds: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Sample:
    """Run commands one after another; wall clock, CPU and peak RSS from wait4."""
    wall = cpu = rss = 0.0
    for cmd in cmds:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall += time.perf_counter() - t0
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} failed ({p.returncode}): {err.strip()}")
        cpu += ru.ru_utime + ru.ru_stime
        rss = max(rss, ru.ru_maxrss / 1024)
    return Sample(round(wall, 4), round(cpu, 4), round(rss, 1))


def size_of(path: Path, exclude: str | None = None) -> int:
    total = 0
    for dirpath, dirnames, names in os.walk(path):
        if exclude and exclude in dirnames:
            dirnames.remove(exclude)
        total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("restic", "restic"), ("borg", "borgbackup"),
                                     ("mkfs.btrfs", "btrfs-progs")) if not shutil.which(tool)]
    if missing:
        print(f"bench: installing {' '.join(missing)} from Debian", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-qq", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


class Btrfs:
    """A btrfs filesystem on a loop device, created and removed by the harness."""

    def __init__(self, work: Path, size: int) -> None:
        self.image, self.mnt = work / "btrfs.img", work / "btrfs"
        with open(self.image, "wb") as f:
            f.truncate(max(size, 1 << 30))
        sh("mkfs.btrfs", "-q", str(self.image))
        self.mnt.mkdir()
        sh("mount", "-o", "loop", str(self.image), str(self.mnt))

    def close(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=False)
        self.image.unlink(missing_ok=True)


def one_run(run: int, args: argparse.Namespace, pristine: Path, many: Path,
            work: Path) -> dict[str, dict[str, Sample]]:
    """All scenarios once; returns scenario -> tool -> sample."""
    out: dict[str, dict[str, Sample]] = {}
    rot = run  # rotate the order of tools between runs

    def order(tools: list[str]) -> list[str]:
        k = rot % len(tools)
        return tools[k:] + tools[:k]

    src = work / "src"
    sh("cp", "-a", str(pristine), str(src))
    dm_env = {**os.environ, "DM_HOME": str(work / "dm"), "DM_AUTHOR": "bench"}
    sh(DM, "init", "app", env=dm_env)
    dm_dir = Path(subprocess.run([DM, "path", "app"], env=dm_env, capture_output=True,
                                 text=True, check=True).stdout.strip())
    os.rmdir(dm_dir)
    sh("cp", "-a", str(pristine), str(dm_dir))
    r_env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "rc")}
    restic = ["restic", "-r", str(work / "restic"), "--quiet"]
    b_env = {**os.environ, "BORG_BASE_DIR": str(work / "bb"),
             "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    borg = str(work / "borg")
    btrfs = Btrfs(work, int(args.size * 3.2))
    live, snaps = btrfs.mnt / "live", btrfs.mnt
    try:
        sh("btrfs", "subvolume", "create", str(live))

        def stored(tool: str) -> int:
            return {"dm": lambda: size_of(work / "dm", exclude="dots"),
                    "restic": lambda: size_of(work / "restic"),
                    "borg": lambda: size_of(work / "borg")}[tool]()

        def step(name: str, runners: dict[str, object], bytes_of: bool = False) -> None:
            res: dict[str, Sample] = {}
            for tool in order(list(runners)):
                before = stored(tool) if bytes_of and tool in ("dm", "restic", "borg") else 0
                s = runners[tool]()  # type: ignore[operator]
                if bytes_of and tool in ("dm", "restic", "borg"):
                    s.stored = stored(tool) - before
                res[tool] = s
            out[name] = res

        def another_commit(label: str) -> dict[str, object]:
            """Every tool's second and later commit, named ``label``."""
            return {
                "dm": lambda: measure([DM, "commit", "-m", label], env=dm_env),
                "restic": lambda: measure([*restic, "backup", str(src)], env=r_env),
                "borg": lambda: measure(["borg", "create", f"{borg}::{label}", str(src)],
                                        env=b_env),
                "btrfs": lambda: measure(["btrfs", "subvolume", "snapshot", "-r", str(live),
                                          str(snaps / label)]),
            }

        sync = ["sync"]
        step("1 initial commit", {
            "dm": lambda: measure([DM, "commit", "-m", "s1"], env=dm_env),
            "restic": lambda: measure([*restic, "init"], [*restic, "backup", str(src)],
                                      env=r_env),
            "borg": lambda: measure(["borg", "init", "--encryption=none", borg],
                                    ["borg", "create", f"{borg}::s1", str(src)], env=b_env),
            "cp -a": lambda: measure(["cp", "-a", str(pristine), str(work / "copy")]),
            "btrfs": lambda: measure(["cp", "-a", f"{src}/.", str(live)],
                                     ["btrfs", "subvolume", "snapshot", "-r", str(live),
                                      str(snaps / "s1")]),
        }, bytes_of=True)
        subprocess.run(sync)
        time.sleep(0.2)  # so that no file is within dotmesh's racy-stat window
        step("2 no-change commit", another_commit("s2"), bytes_of=True)
        changed = 0
        for top in (src, dm_dir, live):
            changed = workload.modify(top, args.size)
        time.sleep(0.2)
        step("3 commit after 1% change", another_commit("s3"), bytes_of=True)
        send = subprocess.run(f"btrfs send -q -p {snaps / 's2'} {snaps / 's3'} | wc -c",
                              shell=True, capture_output=True, text=True, check=True)
        out["4 bytes stored by step 3"] = {
            tool: Sample(0, 0, 0, s.stored) for tool, s in out["3 commit after 1% change"].items()
            if s.stored is not None}
        out["4 bytes stored by step 3"]["btrfs send -p"] = Sample(0, 0, 0, int(send.stdout))
        out["4 bytes stored by step 3"]["bytes changed"] = Sample(0, 0, 0, changed)
        for name in ("restic-out", "borg-out", "restic-first"):
            (work / name).mkdir()
        step("5 full restore of latest", {
            "dm": lambda: measure([DM, "checkout", "-b", "restored"], env=dm_env),
            "restic": lambda: measure([*restic, "restore", "latest", "--target",
                                       str(work / "restic-out")], env=r_env),
            "borg": lambda: measure(["borg", "extract", f"{borg}::s3"], cwd=work / "borg-out",
                                    env=b_env),
        })
        sh(DM, "checkout", "master", env=dm_env)
        first = json.loads(subprocess.run(
            [*restic, "snapshots", "--json"], env=r_env, capture_output=True, text=True,
            check=True).stdout)[0]["short_id"]
        dm_first = json.loads(subprocess.run(
            [DM, "log", "--json"], env=dm_env, capture_output=True, text=True,
            check=True).stdout)[-1]["id"]
        workload.modify(dm_dir, args.size, seed=11)  # a working state to throw away
        workload.modify(live, args.size, seed=11)
        time.sleep(0.2)
        step("6 reset --hard to the first commit", {
            "dm": lambda: measure([DM, "reset", "--hard", dm_first], env=dm_env),
            "restic": lambda: measure([*restic, "restore", first, "--target",
                                       str(work / "restic-first")], env=r_env),
            "btrfs": lambda: measure(["btrfs", "subvolume", "delete", str(live)],
                                     ["btrfs", "subvolume", "snapshot", str(snaps / "s1"),
                                      str(live)]),
        })
        if workload.dir_bytes(dm_dir) != workload.dir_bytes(pristine):
            raise SystemExit("bench: dm reset did not restore the first commit")
        many_env = {**dm_env, "DM_HOME": str(work / "dm-many")}
        sh(DM, "init", "many", env=many_env)
        many_dir = Path(subprocess.run([DM, "path", "many"], env=many_env, capture_output=True,
                                       text=True, check=True).stdout.strip())
        os.rmdir(many_dir)
        sh("cp", "-a", str(many), str(many_dir))
        sh(DM, "commit", "-m", "all files", env=many_env)
        time.sleep(0.2)
        step(f"7 no-change commit, {args.many_files:,} files", {
            "dm": lambda: measure([DM, "commit", "-m", "again"], env=many_env),
        })
    finally:
        btrfs.close()
    return out


def summarize(runs: list[dict[str, dict[str, Sample]]]) -> dict[str, object]:
    summary: dict[str, object] = {}
    for scenario in runs[0]:
        tools: dict[str, object] = {}
        for tool in runs[0][scenario]:
            samples = [r[scenario][tool] for r in runs]
            entry: dict[str, object] = {}
            for field in ("wall", "cpu", "rss_mib", "stored"):
                vals = [getattr(s, field) for s in samples if getattr(s, field) is not None]
                if vals and any(vals):
                    entry[field] = {"median": statistics.median(vals), "min": min(vals),
                                    "max": max(vals)}
            if tool != "dm" and "dm" in runs[0][scenario]:
                field = "stored" if scenario.startswith("4") else "wall"
                ratios = [getattr(r[scenario]["dm"], field) / getattr(r[scenario][tool], field)
                          for r in runs if getattr(r[scenario][tool], field)]
                if ratios:
                    entry["dm_ratio"] = {"median": statistics.median(ratios), "min": min(ratios),
                                         "max": max(ratios), "of": field}
            tools[tool] = entry
        summary[scenario] = tools
    return summary


TARGETS = [  # (scenario, peer, max dm/peer ratio)
    ("1 initial commit", "restic", 0.35), ("1 initial commit", "borg", 0.5),
    ("3 commit after 1% change", "restic", 0.15), ("3 commit after 1% change", "borg", 0.2),
    ("4 bytes stored by step 3", "bytes changed", 2.0),
    ("6 reset --hard to the first commit", "restic", 0.15),
    ("5 full restore of latest", "restic", 0.5),
]


def check_targets(summary: dict[str, dict[str, dict[str, dict[str, float]]]],
                  many_files: int) -> list[tuple[str, str, bool]]:
    rows = []
    for scenario, peer, limit in TARGETS:
        r = summary.get(scenario, {}).get(peer, {}).get("dm_ratio")
        if r:
            rows.append((f"{scenario}: dm/{peer} <= {limit}", f"{r['median']:.3f}",
                         r["median"] <= limit))
    many = next((v for k, v in summary.items() if k.startswith("7")), None)
    if many and many_files >= 200_000:
        w = many["dm"]["wall"]["median"]
        rows.append(("7 no-change commit of 200,000 files <= 1.5 s", f"{w:.2f} s", w <= 1.5))
    peak = max(t.get("rss_mib", {}).get("max", 0) for k, s in summary.items()
               for n, t in s.items() if n == "dm")
    rows.append(("dm peak memory <= 300 MiB at every step", f"{peak:.0f} MiB", peak <= 300))
    return rows


def fmt(v: dict[str, float] | None, unit: str) -> str:
    if not v:
        return "-"
    if unit == "B":
        return f"{v['median'] / MiB:,.1f} MiB"
    if unit == "x":
        return f"{v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]"
    return f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"


def print_table(summary: dict[str, dict[str, dict[str, dict[str, float]]]],
                targets: list[tuple[str, str, bool]]) -> str:
    lines = ["| scenario | tool | wall s | CPU s | peak MiB | stored | dm/tool |",
             "|---|---|---|---|---|---|---|"]
    for scenario, tools in summary.items():
        for tool, e in tools.items():
            lines.append(f"| {scenario} | {tool} | {fmt(e.get('wall'), 's')} | "
                         f"{fmt(e.get('cpu'), 's')} | {fmt(e.get('rss_mib'), 's')} | "
                         f"{fmt(e.get('stored'), 'B')} | {fmt(e.get('dm_ratio'), 'x')} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**MISSED**'} |" for t, m, ok in targets]
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="~100 MiB, 1 run, 20,000 files")
    ap.add_argument("--size-mib", type=int, default=None, help="dataset size (default 2048)")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    ap.add_argument("--many-files", type=int, default=None, help="files in scenario 7")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default /var/tmp)")
    args = ap.parse_args()
    args.size = (args.size_mib or (100 if args.small else 2048)) * MiB
    args.runs = args.runs or (1 if args.small else 3)
    args.many_files = args.many_files or (20_000 if args.small else 200_000)
    out = args.out or Path(__file__).parent / "results" / (
        "latest-small.json" if args.small else "latest.json")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (btrfs needs a loop device)")
    ensure_tools()
    base = Path(tempfile.mkdtemp(prefix="dm-bench-", dir=args.workdir or "/var/tmp"))
    try:
        print(f"bench: generating {args.size / MiB:.0f} MiB and {args.many_files:,} small files "
              f"in {base}", flush=True)
        pristine, many = base / "pristine", base / "many"
        info = workload.generate(pristine, args.size)
        workload.many_files(many, args.many_files)
        runs = []
        for i in range(args.runs):
            print(f"bench: run {i + 1}/{args.runs}", flush=True)
            work = base / f"run{i}"
            work.mkdir()
            runs.append(one_run(i, args, pristine, many, work))
            shutil.rmtree(work)
        summary = summarize(runs)
        targets = check_targets(summary, args.many_files)  # type: ignore[arg-type]
        table = print_table(summary, targets)  # type: ignore[arg-type]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "dataset": {**info, "size_mib": args.size // MiB, "many_files": args.many_files},
            "runs": [{k: {t: asdict(s) for t, s in v.items()} for k, v in r.items()}
                     for r in runs],
            "summary": summary, "targets": targets, "table": table,
            "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
        }, indent=2))
        print(f"bench: results saved to {out}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
