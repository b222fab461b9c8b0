"""CI runs the benchmark harness once, small, to prove it works end to end (run.py with dm's
stores and the raw btrfs/XFS peers only, transfer.py on 8 MiB: what is measured does not
matter here, only that every scenario runs and reports)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmarks in miniature

ROOT = Path(__file__).resolve().parents[2]


def test_bench_small_runs_every_scenario(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--small",
                        "--size-mib", "8", "--many-files", "500", "--only-dm", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    scenarios = list(result["summary"])
    assert [s.split()[0] for s in scenarios] == [str(n) for n in range(1, 12)]
    for scenario in scenarios:
        assert scenario.startswith("9 ") or result["summary"][scenario]["dm"], scenario
    # dm with its store on btrfs, side by side with dm on ext4 (issue 12)
    for n in ("1", "2", "3", "4", "5", "6", "8", "9", "10", "11"):
        scenario = next(s for s in scenarios if s.split()[0] == n)
        assert result["summary"][scenario]["dm (btrfs)"], scenario
    commit = result["summary"]["3 commit after 1% change"]
    assert commit["dm"]["btrfs_ratio"]["median"] > 0
    freeze = result["summary"]["10 freeze window, pages written all over"]
    assert freeze["dm (btrfs)"]["freeze_ms"]["commits"] == 3
    assert result["summary"]["4 bytes stored by step 3"]["bytes changed"]["stored"]["median"] > 0
    assert "| target |" in p.stdout


def test_transfer_bench_small_runs(tmp_path):
    out = tmp_path / "transfer.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer.py"), "--small",
                        "--size-mib", "8", "--out", str(out)], capture_output=True, text=True,
                       timeout=900,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["new_chunks"] > 0 and result["wire"] > 0 and result["rsync_sent_1pct"] > 0
    assert "1% push:" in p.stdout and "| 2 clone, throughput |" in p.stdout


def test_gc_bench_small_runs(tmp_path):
    out = tmp_path / "gc.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gc.py"), "--small",
                        "--size-mib", "16", "--json", str(out)], capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    g = result["gc after deleting half"]
    assert g["freed"] > 0 and abs(g["freed/expected"] - 1) <= 0.05
    assert "target: gc with nothing to do" in p.stdout


def test_browse_bench_small_runs(tmp_path):
    out = tmp_path / "browse.json"
    # dm's side only: the peers (restic and borg mounts, pg_dump) cost CI ~10 s more and ran
    # in the full-size runs bench/README.md reports.
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "browse.py"), "--small",
                        "--size-mib", "8", "--only-dm", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    [mount] = result["mount"]["rounds"]
    assert mount["dm"]["mount_s"] > 0 and mount["dm"]["small_read_rchar"] > 0
    [diff] = result["diff"]["rounds"]
    answer = diff["dm"]["answer"]
    assert (answer["added"], answer["removed"], answer["changed"]) == (200, 100, 300)
    assert "| target |" in p.stdout


def test_pin_bench_small_runs(tmp_path):
    out = tmp_path / "pin.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "pin.py"), "--small", "--rounds",
                        "1", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    for backend in ("plain", "btrfs"):
        assert result[backend]["at_s"] > 0 and result[backend]["ratio"] > 0
    assert "dot.at() around one test" in p.stdout
