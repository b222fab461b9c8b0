#!/usr/bin/env python3
"""Push, clone and pull through a hub on loopback, against rsync's daemon on the same data.

    python bench/transfer.py --small     # ~100 MiB: proves the harness (CI runs it)
    python bench/transfer.py             # ~2 GiB: the real measurement

Every byte that crosses loopback is counted by a proxy in front of the hub (HTTP headers,
negotiation and objects), so the figures are what a network would carry. Scenarios:
1. first push of the dataset (throughput: dataset bytes / wall time), and rsync of it;
2. clone into a second store (throughput);
3. push after the 1% change: wire bytes against the stored size of the commit's new chunks
   (target <= 1.2), and rsync's bytes for the same change;
4. pull of that commit into the clone;
5. (as root) the push of scenario 3 again from stores whose home is on an ext4 and on a btrfs
   loop device, remounted just before the push so that nothing of it is cached: the bytes the
   push reads from the store's disk (the loop device's sectors read), against the bytes the
   1% change wrote (target <= 3).
Needs rsync (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes going each way."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port = target_port, free_port()
        self.up = self.down = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result()

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await r.read(1 << 16):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

    def reset(self) -> None:
        self.up = self.down = 0


def run(*cmd: str, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {p.stderr.strip()}")
    return p.stdout


def timed(*cmd: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run(*cmd, env=env)
    return time.perf_counter() - t0, out


def chunks_stored(home: Path) -> dict[bytes, int]:
    """Each chunk's stored length, from both tables of the index (meta/index.py)."""
    from dotmesh.meta import index

    with sqlite3.connect(home / "meta.db") as c:
        return {r[0]: r[4] for r in index.all_object_rows(c) if r[1] == 0}


def rsync_daemon(top: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    (top / "mirror").mkdir()
    conf = top / "rsyncd.conf"
    conf.write_text(f"use chroot = no\n[mirror]\npath = {top / 'mirror'}\nread only = no\n"
                    "uid = root\ngid = root\n")
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                             "--address=127.0.0.1", f"--port={port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def rsync_to(src: Path, port: int) -> tuple[float, int]:
    """rsync ``src`` to the daemon; wall time and bytes sent (its --stats)."""
    t, out = timed("rsync", "-a", "--stats", f"{src}/", f"rsync://127.0.0.1:{port}/mirror/")
    sent = next(int(line.split(":")[1].split()[0].replace(",", ""))
                for line in out.splitlines() if line.startswith("Total bytes sent"))
    return t, sent


class LoopFs:
    """A filesystem in a sparse file, mounted through a loop device (root only)."""

    MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}

    def __init__(self, top: Path, fs: str, size: int) -> None:
        self.image, self.mnt = top / f"{fs}.img", top / f"{fs}-mnt"
        with open(self.image, "wb") as f:
            f.truncate(size)
        run(*self.MKFS[fs], str(self.image))
        self.mnt.mkdir()
        self.mounted = False
        self.mount()

    def mount(self) -> None:
        run("mount", "-o", "loop", str(self.image), str(self.mnt))
        self.mounted = True

    def remount(self) -> None:
        """Unmount and mount again: nothing of the filesystem stays in the page cache."""
        run("umount", str(self.mnt))
        self.mounted = False
        self.mount()

    def sectors_read(self) -> int:
        """Bytes read from the loop device since it was set up (its /sys stat counter)."""
        dev = Path(run("findmnt", "-n", "-o", "SOURCE", str(self.mnt)).strip()).name
        return int((Path("/sys/block") / dev / "stat").read_text().split()[2]) * 512

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mnt)], check=False)
        self.image.unlink(missing_ok=True)


def own_read_bytes() -> int:
    """This process's read_bytes, which includes its reaped children's (kernel/exit.c)."""
    text = Path("/proc/self/io").read_text()
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("read_bytes:")))


def push_reads(top: Path, fs: str, data: Path, size: int, env: dict[str, str],
               hub: str) -> dict[str, int | float]:
    """Push a 1% change from a store on ``fs``, just remounted: what it read from disk."""
    loop = LoopFs(top, fs, size * 3 + (1 << 30))
    try:
        dot = f"app-{fs}"
        e = {**env, "DM_HOME": str(loop.mnt / "home")}
        run(DM, "init", dot, env=e)
        mine = Path(run(DM, "path", f"{dot}.data", env=e).strip())
        run("cp", "-a", f"{data}/.", str(mine))
        run(DM, "commit", "-m", "first", env=e)
        run(DM, "remote", "add", "hub", hub, "--http", env=e)
        run(DM, "push", "hub", env=e)
        changed = workload.modify(mine, size, seed=13)
        time.sleep(0.2)
        run(DM, "commit", "-m", "1% later", env=e)
        loop.remount()
        dev0, own0 = loop.sectors_read(), own_read_bytes()
        t, _ = timed(DM, "push", "hub", env=e)
        dev, own = loop.sectors_read() - dev0, own_read_bytes() - own0
        backend = json.loads(run(DM, "version", "--json", env=e))["backend"]
    finally:
        loop.close()
    return {"fs": fs, "backend": backend, "changed": changed, "device_read": dev,
            "process_read": own, "wall": t, "ratio": dev / changed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="~100 MiB instead of ~2 GiB")
    ap.add_argument("--size-mib", type=int, default=None,
                    help="dataset size (default 100 with --small, else 2048)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the JSON results")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("bench: rsync is needed (scripts/setup.sh installs it)")
    size = (args.size_mib or (100 if args.small else 2048)) * MiB
    top = Path(tempfile.mkdtemp(prefix="dm-transfer-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        results = measure(top, size, procs)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(top, ignore_errors=True)
    print(f"\n| scenario ({size // MiB} MiB dataset) | dm | rsync | dm/rsync |")
    print("|---|---|---|---|")
    for row in results["table"]:
        print("| " + " | ".join(row) + " |")
    ratio = results["ratio"]
    print(f"\n1% push: {results['wire']:,} bytes on the wire for {results['new_chunks']:,} bytes "
          f"of new chunks stored: {ratio:.3f}x (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else 'MISSED'})")
    reads = results.get("push_reads") or []
    if reads:
        print(f"\n| 1% push from a store just mounted ({size // MiB} MiB dataset) | bytes changed "
              "| read from the store's disk | x changed (target <= 3) | read by the dm process "
              "| wall s |")
        print("|---|---|---|---|---|---|")
    for r in reads:
        print(f"| dm on {r['fs']} ({r['backend']} backend) | {r['changed'] / 1e6:,.1f} MB | "
              f"{r['device_read'] / 1e6:,.1f} MB | {r['ratio']:.2f} "
              f"({'met' if r['ratio'] <= 3 else 'MISSED'}) | {r['process_read'] / 1e6:,.1f} MB "
              f"| {r['wall']:.2f} |")
    if not reads:
        print("\n(not root: the disk reads of a push, which need loop devices, were not measured)")
    out = args.out or (Path(__file__).resolve().parent / "results" /
                       f"transfer{'-small' if args.small else ''}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def measure(top: Path, size: int, procs: list[subprocess.Popen[bytes]]) -> dict[str, object]:
    hub_port = free_port()
    hub = ["--data", str(top / "hub")]
    key = json.loads(run(DM, "hub", *hub, "user", "add", "alice", "--json"))["api_key"]
    procs.append(subprocess.Popen([DM, "hub", *hub, "serve", "--port", str(hub_port),
                                   "--workers", str(os.cpu_count() or 1)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", hub_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    proxy = CountingProxy(hub_port)
    rsyncd, rsync_port = rsync_daemon(top)
    procs.append(rsyncd)
    a = {**os.environ, "DM_HOME": str(top / "alice"), "DM_API_KEY": key, "DM_AUTHOR": "bench"}
    b = {**a, "DM_HOME": str(top / "bob")}
    run(DM, "init", "app", env=a)
    data = Path(run(DM, "path", "app.data", env=a).strip())
    print(f"bench: generating {size // MiB} MiB", flush=True)
    workload.generate(data, size)
    total = workload.dir_bytes(data)
    run(DM, "commit", "-m", "first", env=a)
    run(DM, "init", env=b)  # bob's store, for the clone
    for env in (a, b):
        run(DM, "remote", "add", "hub", f"alice@127.0.0.1:{proxy.port}", "--http", env=env)

    proxy.reset()
    t_push, _ = timed(DM, "push", "hub", env=a)
    push_wire = proxy.up + proxy.down
    t_rsync, rsync_first = rsync_to(data, rsync_port)
    print(f"bench: first push {t_push:.2f} s, rsync {t_rsync:.2f} s", flush=True)
    proxy.reset()
    t_clone, _ = timed(DM, "clone", "hub", "alice/app", env=b)
    clone_wire = proxy.up + proxy.down

    before = chunks_stored(top / "alice")
    changed = workload.modify(data, size)
    run(DM, "commit", "-m", "1% later", env=a)
    new_chunks = sum(n for oid, n in chunks_stored(top / "alice").items() if oid not in before)
    proxy.reset()
    t_push2, _ = timed(DM, "push", "hub", env=a)
    wire = proxy.up + proxy.down
    t_rsync2, rsync_sent = rsync_to(data, rsync_port)
    proxy.reset()
    t_pull, _ = timed(DM, "pull", "hub", env=b)
    pull_wire = proxy.up + proxy.down
    mb = total / 1e6
    reads = []
    if os.geteuid() == 0:
        for fs in ("ext4", "btrfs"):
            print(f"bench: push of a 1% change from a store on {fs}", flush=True)
            reads.append(push_reads(top, fs, data, size, a, f"alice@127.0.0.1:{proxy.port}"))

    def row(name: str, dm: float, peer: float | None, unit: str) -> list[str]:
        return [name, f"{dm:,.1f} {unit}", f"{peer:,.1f} {unit}" if peer else "-",
                f"{dm / peer:.2f}" if peer else "-"]

    table = [
        row("1 first push, throughput", mb / t_push, mb / t_rsync, "MB/s"),
        row("1 first push, wall", t_push, t_rsync, "s"),
        row("1 first push, MB on the wire", push_wire / 1e6, rsync_first / 1e6, "MB"),
        row("2 clone, throughput", mb / t_clone, None, "MB/s"),
        row("2 clone, MB on the wire", clone_wire / 1e6, None, "MB"),
        row("3 push after 1% change, wall", t_push2, t_rsync2, "s"),
        row("3 push after 1% change, MB on the wire", wire / 1e6, rsync_sent / 1e6, "MB"),
        row("4 pull of that change, wall", t_pull, None, "s"),
        row("4 pull of that change, MB on the wire", pull_wire / 1e6, None, "MB"),
    ]
    return {"dataset_bytes": total, "changed_bytes": changed, "new_chunks": new_chunks,
            "wire": wire, "ratio": wire / new_chunks, "rsync_sent_1pct": rsync_sent,
            "table": table, "push_reads": reads}


if __name__ == "__main__":
    main()
