"""Wall time of short ``dm`` commands (start-up dominated), median of N runs.

    .venv/bin/python bench/startup.py [-n 15] [--dm .venv/bin/dm]

Each command runs on a fresh small store (DM_HOME in a temporary folder): one dot with one
subdot of a few files and enough commits for every ``reset --hard HEAD^``. Sources must be
compiled first (``python -m compileall -q src/dotmesh``) under PYTHONDONTWRITEBYTECODE=1, or
this times the compiler.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _dm(dm: str, env: dict[str, str], *args: str) -> str:
    return subprocess.run([dm, *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def _timed(dm: str, env: dict[str, str], args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([dm, *args], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=15)
    p.add_argument("--dm", default=str(Path(__file__).parent.parent / ".venv/bin/dm"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DM_HOME": tmp}
        _dm(a.dm, env, "init", "app")
        data = Path(_dm(a.dm, env, "path", "app.db").strip())
        for i in range(a.n + 1):
            (data / f"f{i % 5}").write_text(f"state {i}\n" * 100)
            _dm(a.dm, env, "commit", "-m", f"c{i}", "--no-freeze")
        runs: dict[str, list[float]] = {}
        for i in range(a.n):  # interleaved, so drift hits every command alike
            for name, args in [("version", ["version"]), ("--help", ["--help"]),
                               ("list", ["list"]), ("checkout -b", ["checkout", "-b", f"b{i}"]),
                               ("reset --hard HEAD^", ["reset", "--hard", "HEAD^"])]:
                runs.setdefault(name, []).append(_timed(a.dm, env, args))
    for name, ts in runs.items():
        print(f"{name:<20} median {statistics.median(ts) * 1000:6.0f} ms   "
              f"min {min(ts) * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
