#!/usr/bin/env python3
"""Why paged files get fixed 8 KiB blocks: bytes stored after a 1% database-like change, and
first-commit time, for several chunkings of the same workload.

    python bench/chunking.py [--size-mib 512]

Each strategy snapshots the dataset into a fresh store, applies the 1% modification, snapshots
again, and reports what the second snapshot added. Paged files (multiples of 8 KiB) get the
strategy under test; other files keep FastCDC 64 KiB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

from dotmesh.meta.db import connect  # noqa: E402
from dotmesh.store import chunker  # noqa: E402
from dotmesh.store.packs import PackStore  # noqa: E402
from dotmesh.workdir.snapshot import snapshot  # noqa: E402

MiB = 1 << 20
STRATEGIES = [("fixed 8 KiB", 8192, None), ("fixed 16 KiB", 16384, None),
              ("fixed 64 KiB", 65536, None), ("CDC 16 KiB", None, 16384),
              ("CDC 64 KiB", None, 65536)]


def run(name: str, block: int | None, cdc_avg: int | None, data: Path, size: int,
        base: Path) -> tuple[str, float, float, int, int]:
    work = base / name.replace(" ", "_")
    shutil.copytree(data, work / "data", symlinks=True)
    store = PackStore(work, connect(work / "meta.db"))
    saved = chunker.PAGE_BLOCK, chunker.is_paged
    try:
        if block:
            chunker.PAGE_BLOCK = block
        else:  # treat paged files like any other file, cut by FastCDC at this average
            chunker.is_paged = lambda size: False  # type: ignore[assignment]
            chunker.CDC = chunker.FastCDC(avg_size=cdc_avg)
        w = store.writer()
        t0 = time.perf_counter()
        first = snapshot(work / "data", store, w, {})
        w.flush()
        t_first = time.perf_counter() - t0
        changed = workload.modify(work / "data", size)
        time.sleep(0.15)
        w = store.writer()
        t0 = time.perf_counter()
        snapshot(work / "data", store, w, first.cache)
        w.flush()
        t_inc = time.perf_counter() - t0
        return name, t_first, t_inc, w.bytes_written, changed
    finally:
        chunker.PAGE_BLOCK, chunker.is_paged = saved
        chunker.CDC = chunker.FastCDC(avg_size=chunker.CDC_AVG)
        store.close()
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args()
    size = args.size_mib * MiB
    base = Path(tempfile.mkdtemp(prefix="dm-chunking-", dir="/var/tmp"))
    try:
        data = base / "pristine"
        workload.generate(data, size)
        print(f"| chunking of paged files ({args.size_mib} MiB dataset) | first snapshot s | "
              "snapshot after 1% s | stored by it | x bytes changed |")
        print("|---|---|---|---|---|")
        for name, block, avg in STRATEGIES:
            n, t1, t2, stored, changed = run(name, block, avg, data, size, base)
            print(f"| {n} | {t1:.2f} | {t2:.2f} | {stored / MiB:.1f} MiB | "
                  f"{stored / changed:.2f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
