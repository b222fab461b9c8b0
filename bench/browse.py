#!/usr/bin/env python3
"""Browsing the library of states (issue 15): ``dm mount`` and ``dm diff --data``, against
what a user would do instead with restic, borg and pg_dump, measured in the same run.

    python bench/browse.py --small      # ~48 MiB dataset, ~22 MiB database, 1 round (CI)
    python bench/browse.py              # ~2 GiB dataset, ~100 MiB database, 3 rounds
    python bench/browse.py --only-dm    # no restic, borg or pg_dump

Scenarios:
1. A commit of the polyglot dataset (bench/workload.py), mounted with ``dm mount HEAD DIR``;
   against ``restic mount`` of a snapshot and ``borg mount`` of an archive of the same folder.
   Each round mounts afresh (the kernel keeps nothing of a previous mount) and measures:
   a. mount: from the command's start until the mount table lists it and the data's top
      folder can be listed (for dm also when ``dm mount`` returned: it waits for its server);
   b. first byte: open the largest database-like file and read 8 KiB at a random page
      (the same page for every tool in a round), and what the serving process read
      meanwhile (``rchar`` of /proc/PID/io: every read call, page cache or disk);
   c. one small upload (1-100 KiB) looked up and read whole, and the bytes read for each.
   Every byte read is compared with the dataset. The store files are warm in the page cache
   (just written, as after a commit), for every tool alike.
2. ``dm diff --data HEAD^ HEAD --json`` on a PostgreSQL database made by ``pgbench -i``
   (~100 MiB), committed while it runs (after a CHECKPOINT), then 200 rows inserted, 300
   updated, 100 deleted and a column added, committed again; the answer must name exactly
   those. Against the same by hand: ``dm export`` of each commit's data directory,
   PostgreSQL started on each, ``pg_dump``, ``diff -u`` of the dumps.
Peers run back to back with dm in an order that rotates between rounds; each ratio dm/peer is
taken within a round. A peer that cannot run here is skipped with its reason. Needs root
(FUSE mounts, the postgres service user); installs restic, borgbackup and python3-pyfuse3
(borg's FUSE) from Debian if they are missing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

DM = str(Path(sys.executable).parent / "dm")
MiB = 1 << 20
MOUNT_TIMEOUT = 300.0  # borg reads an archive's whole item list before it serves
PG_BIN = (sorted(glob.glob("/usr/lib/postgresql/*/bin")) or [""])[-1]
INSERTED, UPDATED, DELETED = 200, 300, 100  # rows the second commit of scenario 2 changes
TARGET_MOUNT_S = 1.0
SMALL_SLACK = 16 << 10  # a read may also read a few 4 KiB pages of the store's index


class Skip(Exception):
    """A peer that cannot run on this machine: why."""


def sh(*cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({p.returncode}): "
                         f"{p.stderr.strip()[-1000:]}")
    return p.stdout


def measured(cmd: list[str], env: dict[str, str] | None = None,
             stdout: int | Any = subprocess.PIPE, ok: tuple[int, ...] = (0,)
             ) -> tuple[str, dict[str, float]]:
    """A command's output, wall and CPU seconds (its own and its reaped children's: a
    postgres it started and stopped) and peak resident MiB, from wait4."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=err, stdin=subprocess.DEVNULL)
        out = p.stdout.read() if p.stdout else b""
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if p.stdout:
            p.stdout.close()
        code = os.waitstatus_to_exitcode(status)
        if code not in ok:
            err.seek(0)
            raise SystemExit(f"bench: {' '.join(cmd)} failed ({code}): "
                             f"{err.read().decode(errors='replace').strip()[-1000:]}")
    return out.decode(errors="replace"), {"wall": round(wall, 4),
                                          "cpu": round(ru.ru_utime + ru.ru_stime, 4),
                                          "rss_mib": round(ru.ru_maxrss / 1024, 1)}


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("restic", "restic"), ("borg", "borgbackup"))
               if not shutil.which(tool)]
    fuse = ("import importlib.util as u, sys; "
            "sys.exit(not (u.find_spec('pyfuse3') or u.find_spec('llfuse')))")
    if os.path.exists("/usr/bin/python3") and subprocess.run(
            ["/usr/bin/python3", "-c", fuse]).returncode != 0:
        missing.append("python3-pyfuse3")  # what Debian's borgbackup recommends for mount
    if missing:
        print(f"bench: installing {' '.join(missing)} from Debian", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-qq", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


# ------------------------------------------------------------------ scenario 1: mounts


def listed(where: Path) -> bool:
    """Whether the mount table lists a mount at ``where``."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                           line.split(" ")[4])
            if point == str(where):
                return True
    return False


def read_io(pid: int) -> dict[str, int]:
    """What a process has read so far: ``rchar`` (every read call) and ``read_bytes``
    (from the disk)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}


class Tool:
    """One way to mount the commit: started by :meth:`mount`, which returns the serving
    process's pid (once its command returned, for dm); :meth:`top` is the dataset's folder
    inside the mount."""

    name = ""
    proc: subprocess.Popen[bytes] | None = None

    def mount(self, mnt: Path) -> int:
        raise NotImplementedError

    def top(self, mnt: Path) -> Path:
        raise NotImplementedError

    def died(self) -> str | None:
        """Why the serving process ended, if it did (a peer that cannot mount here)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        assert self.proc.stderr is not None
        tail = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return f"exit {self.proc.returncode}: {tail[-1] if tail else 'no message'}"

    def unmount(self, mnt: Path) -> None:
        if listed(mnt):
            sh("fusermount3", "-u", str(mnt))
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class DmTool(Tool):
    name = "dm"

    def __init__(self, env: dict[str, str], subdot: str) -> None:
        self.env, self.subdot, self.pid = env, subdot, 0

    def mount(self, mnt: Path) -> int:
        self.pid = int(json.loads(sh(DM, "mount", "HEAD", str(mnt), "--json",
                                     env=self.env))["pid"])
        return self.pid

    def top(self, mnt: Path) -> Path:
        return mnt / self.subdot

    def died(self) -> str | None:
        return None if os.path.exists(f"/proc/{self.pid}") else "the mount server ended"

    def unmount(self, mnt: Path) -> None:
        sh(DM, "umount", str(mnt), env=self.env)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.01)


class ResticTool(Tool):
    name = "restic"

    def __init__(self, repo: Path, env: dict[str, str], data: Path) -> None:
        self.repo, self.env, self.data = repo, env, data

    def mount(self, mnt: Path) -> int:
        self.proc = subprocess.Popen(["restic", "-r", str(self.repo), "mount", str(mnt)],
                                     env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self.proc.pid

    def top(self, mnt: Path) -> Path:
        return mnt / "snapshots" / "latest" / str(self.data).lstrip("/")


class BorgTool(Tool):
    name = "borg"

    def __init__(self, archive: str, env: dict[str, str], data: Path) -> None:
        self.archive, self.env, self.data = archive, env, data

    def mount(self, mnt: Path) -> int:
        self.proc = subprocess.Popen(["borg", "mount", "-f", self.archive, str(mnt)],
                                     env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self.proc.pid

    def top(self, mnt: Path) -> Path:
        return mnt / str(self.data).lstrip("/")


def one_mount(tool: Tool, mnt: Path, data: Path, big: str, page: int, small: str
              ) -> dict[str, Any]:
    """Mount, read 8 KiB of ``big`` at ``page`` and all of ``small``, unmount: the times and
    the bytes the serving process read for each step."""
    t0 = time.perf_counter()
    pid = tool.mount(mnt)
    returned = time.perf_counter() - t0
    top = tool.top(mnt)
    while True:
        why = tool.died()
        if why is not None:
            tool.unmount(mnt)
            raise Skip(f"{tool.name} mount ended before it served: {why}")
        if listed(mnt):
            try:
                os.listdir(top)
                break
            except OSError:
                pass
        if time.perf_counter() - t0 > MOUNT_TIMEOUT:
            tool.unmount(mnt)
            raise SystemExit(f"bench: {tool.name} did not serve {top} in {MOUNT_TIMEOUT} s")
        time.sleep(0.002)
    usable = time.perf_counter() - t0
    try:
        io0 = read_io(pid)
        t1 = time.perf_counter()
        fd = os.open(top / big, os.O_RDONLY)
        try:
            got = os.pread(fd, workload.PAGE, page * workload.PAGE)
        finally:
            os.close(fd)
        first_byte = time.perf_counter() - t1
        io1 = read_io(pid)
        with open(data / big, "rb") as f:
            f.seek(page * workload.PAGE)
            if got != f.read(workload.PAGE):
                raise SystemExit(f"bench: {tool.name} mount read wrong bytes from {big}")
        t2 = time.perf_counter()
        os.stat(top / small)
        looked_up = time.perf_counter() - t2
        io2 = read_io(pid)
        t3 = time.perf_counter()
        whole = (top / small).read_bytes()
        read_small = time.perf_counter() - t3
        io3 = read_io(pid)
        if whole != (data / small).read_bytes():
            raise SystemExit(f"bench: {tool.name} mount read wrong bytes from {small}")
    finally:
        tool.unmount(mnt)
    return {
        "mount_s": round(usable, 4),
        "command_returned_s": round(returned, 4) if isinstance(tool, DmTool) else None,
        "first_byte_s": round(first_byte, 4),
        "first_byte_rchar": io1["rchar"] - io0["rchar"],
        "first_byte_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "small_lookup_s": round(looked_up, 4),
        "small_lookup_rchar": io2["rchar"] - io1["rchar"],
        "small_read_s": round(read_small, 4),
        "small_read_rchar": io3["rchar"] - io2["rchar"],
        "small_read_read_bytes": io3["read_bytes"] - io2["read_bytes"],
        "small_size": len(whole),
        "small_lookup_and_read_s": round(looked_up + read_small, 4),
    }


def mount_scenario(work: Path, args: argparse.Namespace, skipped: dict[str, str]
                   ) -> dict[str, Any]:
    env = {**os.environ, "DM_HOME": str(work / "dm"), "DM_AUTHOR": "bench"}
    sh(DM, "init", "app", env=env)
    data = Path(sh(DM, "path", "app", env=env).strip())
    print(f"bench: generating {args.size / MiB:.0f} MiB in {data}", flush=True)
    t = time.perf_counter()
    info: dict[str, Any] = {**workload.generate(data, args.size),
                            "generate_s": round(time.perf_counter() - t, 1)}
    _, commit = measured([DM, "commit", "-m", "the polyglot app"], env=env)
    tools: list[Tool] = [DmTool(env, subdot_of(env))]
    made = {"dm commit": commit}
    if not args.only_dm:
        r_env = {**os.environ, "RESTIC_PASSWORD": "bench",
                 "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        b_env = {**os.environ, "BORG_BASE_DIR": str(work / "borg-base"),
                 "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        if shutil.which("restic"):
            restic = ["restic", "-r", str(work / "restic"), "--quiet"]
            _, made["restic init + backup"] = measured([*restic, "init"], env=r_env)
            _, s = measured([*restic, "backup", str(data)], env=r_env)
            made["restic init + backup"]["wall"] += s["wall"]
            tools.append(ResticTool(work / "restic", r_env, data))
        else:
            skipped["restic"] = "restic is not installed"
        if shutil.which("borg"):
            borg = str(work / "borg")
            sh("borg", "init", "-e", "none", borg, env=b_env)
            _, made["borg create"] = measured(["borg", "create", f"{borg}::app", str(data)],
                                              env=b_env)
            tools.append(BorgTool(f"{borg}::app", b_env, data))
        else:
            skipped["borg"] = "borg is not installed"
    for tool in tools:
        if tool.name in skipped:
            print(f"bench: {tool.name} mount skipped: {skipped[tool.name]}", flush=True)
    shape = workload.Shape(args.size)
    big = "pg/16384"  # the three database-like files are the largest, all of one size
    uploads = sorted(f"uploads/{n}" for n in os.listdir(data / "uploads"))
    rounds = []
    mnt = work / "mnt"
    mnt.mkdir()
    for r in range(args.rounds):
        rng = random.Random(1000 + r)
        page, small = rng.randrange(shape.db_size // workload.PAGE), rng.choice(uploads)
        k = r % len(tools)
        res: dict[str, Any] = {"page": page, "small": small}
        for tool in tools[k:] + tools[:k]:
            if tool.name in skipped:
                continue
            try:
                res[tool.name] = one_mount(tool, mnt, data, big, page, small)
            except Skip as e:
                skipped[tool.name] = str(e)
                print(f"bench: {e}: skipped", flush=True)
        rounds.append(res)
        print(f"bench: mount round {r + 1}/{args.rounds}: " + ", ".join(
            f"{t.name} {res[t.name]['mount_s']:.3f} s" for t in tools if t.name in res),
              flush=True)
    return {"dataset": {**info, "size_mib": args.size // MiB, "big_file": big,
                        "big_file_size": shape.db_size},
            "made": made, "rounds": rounds}


def subdot_of(env: dict[str, str]) -> str:
    """The folder the default subdot has at a mount's top (its only subdot)."""
    listing = json.loads(sh(DM, "ls", "HEAD", "--json", env=env))
    names = [e["subdot"] for e in listing] if isinstance(listing, list) else []
    if len(names) != 1:
        raise SystemExit(f"bench: expected one subdot at the top of the commit, got {names}")
    return str(names[0])


# ------------------------------------------------------------------ scenario 2: diff --data


def as_postgres(*cmd: str) -> str:
    return sh("runuser", "-u", "postgres", "--", *cmd)


class Postgres:
    """A postmaster on ``data`` as the postgres user, on a private socket only."""

    def __init__(self, data: Path, sock: Path) -> None:
        self.data, self.sock = data, sock
        sock.mkdir(exist_ok=True)
        shutil.chown(sock, "postgres", "postgres")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [f"{PG_BIN}/postgres", "-D", str(self.data), "-k", str(self.sock),
             "-c", "listen_addresses=", "-p", "5432"], user="postgres", group="postgres",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        for _ in range(6000):
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: postgres on {self.data} exited "
                                 f"({self.proc.returncode})")
            if subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", str(self.sock), "-p",
                               "5432"], stdin=subprocess.DEVNULL).returncode == 0:
                return
            time.sleep(0.02)
        raise SystemExit("bench: postgres did not become ready in 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # a fast shutdown
            self.proc.wait(timeout=120)
            self.proc = None

    def sql(self, query: str) -> str:
        return as_postgres(f"{PG_BIN}/psql", "-h", str(self.sock), "-p", "5432", "-U",
                           "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc",
                           query).strip()


CHANGES = f"""
BEGIN;
DELETE FROM pgbench_accounts WHERE aid <= {DELETED};
UPDATE pgbench_accounts SET abalance = abalance + 7, filler = 'changed by the bench'
  WHERE aid > 1000 AND aid <= {1000 + UPDATED};
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
  SELECT (SELECT max(aid) FROM pgbench_accounts) + g, 1, g, 'added by the bench'
  FROM generate_series(1, {INSERTED}) g;
ALTER TABLE pgbench_branches ADD COLUMN note text;
COMMIT;
"""


def pg_store(top: Path, scale: int) -> tuple[dict[str, str], int, dict[str, Any]]:
    """A store in ``top`` whose dot holds a pgbench database in two commits (before and
    after :data:`CHANGES`); its env, the database's size and the commits' samples."""
    env = {**os.environ, "DM_HOME": str(top / "home"), "DM_AUTHOR": "bench"}
    sh(DM, "init", "app", env=env)
    users = Path(sh(DM, "path", "app.users-db", env=env).strip())
    os.chmod(top / "home", 0o755)
    shutil.chown(users, "postgres", "postgres")
    os.chmod(users, 0o700)
    as_postgres(f"{PG_BIN}/initdb", "-D", str(users), "-A", "trust", "-U", "postgres")
    pg = Postgres(users, top / "sock")
    pg.start()
    made: dict[str, Any] = {}
    try:
        as_postgres(f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(scale), "-h", str(pg.sock),
                    "-p", "5432", "-U", "postgres", "postgres")
        size = int(pg.sql("SELECT pg_database_size('postgres')"))
        pg.sql("CHECKPOINT")  # what a pre-freeze hook would do
        _, made["first commit"] = measured([DM, "commit", "-m", "pgbench"], env=env)
        pg.sql(CHANGES)
        pg.sql("CHECKPOINT")
        _, made["second commit"] = measured([DM, "commit", "-m", "changed rows"], env=env)
    finally:
        pg.stop()
    return env, size, made


def check_diff(out: str) -> dict[str, Any]:
    """The counts ``dm diff --data --json`` gives for the changed table; exits unless they
    are the changes made."""
    reports = {r["subdot"]: r for r in json.loads(out)}
    dbs = {d["path"]: d for d in reports["users-db"]["databases"]}
    t = dbs["postgres"]["tables"]["public.pgbench_accounts"]
    got = {"added": t["added"], "removed": t["removed"], "changed": t["changed"]}
    want = {"added": INSERTED, "removed": DELETED, "changed": UPDATED}
    schema = [s["name"] for s in dbs["postgres"]["schema"]]
    if got != want or "column public.pgbench_branches.note" not in schema:
        raise SystemExit(f"bench: dm diff --data said {got} and schema {schema}; "
                         f"the bench changed {want} and added pgbench_branches.note")
    others = sorted(set(dbs["postgres"]["tables"]) - {"public.pgbench_accounts"})
    return {**got, "schema": schema, "other_tables": others}


def by_hand(env: dict[str, str], work: Path) -> dict[str, Any]:
    """The peer: export each commit's data directory, start PostgreSQL on it, pg_dump it,
    then diff the two dumps."""
    work.mkdir()
    os.chmod(work, 0o755)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # every child: exports, postgres...
    steps: dict[str, float] = {"export": 0.0, "start, pg_dump, stop": 0.0}
    for side, ref in (("a", "HEAD^"), ("b", "HEAD")):
        data = work / side
        _, s = measured([DM, "export", ref, str(data), "--subdot", "users-db"], env=env)
        steps["export"] += s["wall"]
        t = time.perf_counter()
        for dirpath, dirs, files in os.walk(data):
            for name in (".", *dirs, *files):
                os.lchown(os.path.join(dirpath, name), *owner_ids())
        (data / "postmaster.pid").unlink(missing_ok=True)  # committed while it ran
        os.chmod(data, 0o700)
        pg = Postgres(data, work / f"sock-{side}")
        pg.start()
        try:
            with open(work / f"{side}.sql", "wb") as f:
                measured(["runuser", "-u", "postgres", "--", f"{PG_BIN}/pg_dump", "-h",
                          str(pg.sock), "-p", "5432", "-U", "postgres", "postgres"], stdout=f)
        finally:
            pg.stop()
        steps["start, pg_dump, stop"] += time.perf_counter() - t
    with open(work / "dumps.diff", "wb") as f:
        _, s = measured(["diff", "-u", str(work / "a.sql"), str(work / "b.sql")], stdout=f,
                        ok=(0, 1))
    steps["diff"] = s["wall"]
    lines = (work / "dumps.diff").read_bytes().splitlines()
    minus = sum(1 for x in lines if x.startswith(b"-") and not x.startswith(b"---"))
    plus = sum(1 for x in lines if x.startswith(b"+") and not x.startswith(b"+++"))
    out = {k: round(v, 4) for k, v in steps.items()}
    out["wall"] = round(sum(steps.values()), 4)
    out["wall_without_export"] = round(out["wall"] - steps["export"], 4)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 4)
    out.update({"dump_bytes": (work / "b.sql").stat().st_size, "lines_removed": minus,
                "lines_added": plus})
    shutil.rmtree(work)
    return out


def owner_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def diff_scenario(args: argparse.Namespace, skipped: dict[str, str]) -> dict[str, Any]:
    if not PG_BIN or not os.path.exists(f"{PG_BIN}/pgbench"):
        raise SystemExit("bench: needs PostgreSQL with pgbench (scripts/setup.sh installs it)")
    top = Path(tempfile.mkdtemp(prefix="dm-browse-pg-", dir="/tmp"))  # postgres must reach it
    os.chmod(top, 0o755)
    try:
        print(f"bench: pgbench -i -s {args.pg_scale} into a dot, two commits", flush=True)
        env, size, made = pg_store(top, args.pg_scale)
        rounds = []
        for r in range(args.rounds):
            res: dict[str, Any] = {}
            for who in (["dm", "pg_dump + diff"] if r % 2 == 0 else ["pg_dump + diff", "dm"]):
                if who == "dm":
                    out, s = measured([DM, "diff", "--data", "HEAD^", "HEAD", "--json"],
                                      env=env)
                    res["dm"] = {**s, "answer": check_diff(out)}
                elif not args.only_dm:
                    res[who] = by_hand(env, top / f"by-hand-{r}")
            rounds.append(res)
            print(f"bench: diff round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['wall']:.2f} s" for k, v in res.items()), flush=True)
        if args.only_dm:
            skipped["pg_dump + diff"] = "--only-dm"
        return {"database_bytes": size, "pgbench_scale": args.pg_scale, "made": made,
                "rounds": rounds}
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------ summary


def spread(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


MOUNT_FIELDS = ("mount_s", "command_returned_s", "first_byte_s", "first_byte_rchar",
                "small_lookup_rchar", "small_read_s", "small_read_rchar",
                "small_lookup_and_read_s", "small_size")
RATIO_FIELDS = ("mount_s", "first_byte_s", "small_read_s", "small_lookup_and_read_s")
PEERS = ("restic", "borg")


def summarize(mounts: dict[str, Any], diffs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"mount": {}, "diff": {}}
    for tool in ("dm", *PEERS):
        runs = [r[tool] for r in mounts["rounds"] if tool in r]
        if not runs:
            continue
        e: dict[str, Any] = {f: spread([float(x[f]) for x in runs]) for f in MOUNT_FIELDS
             if all(x.get(f) is not None for x in runs)}
        if tool != "dm":
            both = [r for r in mounts["rounds"] if tool in r and "dm" in r]
            e["dm_ratio"] = {f: spread([r["dm"][f] / r[tool][f] for r in both])
                             for f in RATIO_FIELDS if all(r[tool][f] > 0 for r in both)}
        out["mount"][tool] = e
    for who in ("dm", "pg_dump + diff"):
        runs = [r[who] for r in diffs["rounds"] if who in r]
        if runs:
            out["diff"][who] = {f: spread([float(x[f]) for x in runs])
                                for f in ("wall", "cpu", "rss_mib", "wall_without_export")
                                if f in runs[0]}
    both = [r for r in diffs["rounds"] if "dm" in r and "pg_dump + diff" in r]
    if both:
        peer = out["diff"]["pg_dump + diff"]
        peer["dm_ratio"] = spread([r["dm"]["wall"] / r["pg_dump + diff"]["wall"] for r in both])
        peer["dm_cpu_ratio"] = spread([r["dm"]["cpu"] / r["pg_dump + diff"]["cpu"] for r in both])
        peer["dm_ratio_without_export"] = spread(
            [r["dm"]["wall"] / r["pg_dump + diff"]["wall_without_export"] for r in both])
    return out


def fmt(v: dict[str, float] | None, unit: str = "s") -> str:
    if not v:
        return "-"
    if unit == "KiB":
        return f"{v['median'] / 1024:,.1f} KiB"
    if unit == "x":
        return f"{v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]"
    if unit == "ms":
        return f"{v['median'] * 1000:.1f} [{v['min'] * 1000:.1f}-{v['max'] * 1000:.1f}]"
    return f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"


def table(summary: dict[str, Any], mounts: dict[str, Any], diffs: dict[str, Any],
          skipped: dict[str, str]) -> tuple[str, list[tuple[str, str, bool]]]:
    size = mounts["dataset"]["size_mib"]
    m = summary["mount"]
    lines = [f"| scenario ({size} MiB commit) | " + " | ".join(m) + " | "
             + " | ".join(f"dm/{p}" for p in m if p != "dm") + " |",
             "|---|" + "---|" * (2 * len(m) - 1)]
    rows: list[tuple[str, str, str]] = [
        ("1a mount until usable, s", "mount_s", "s"),
        ("1a `dm mount` returned, s", "command_returned_s", "s"),
        ("1b first 8 KiB of a database file, ms", "first_byte_s", "ms"),
        ("1b bytes read by the server for it", "first_byte_rchar", "KiB"),
        ("1c small upload looked up and read whole, ms", "small_lookup_and_read_s", "ms"),
        ("1c its read alone, ms", "small_read_s", "ms"),
        ("1c bytes read by the server for its lookup", "small_lookup_rchar", "KiB"),
        ("1c bytes read by the server for its read", "small_read_rchar", "KiB"),
        ("1c the upload's size", "small_size", "KiB")]
    for label, field, unit in rows:
        cells = [fmt(m[t].get(field), unit) for t in m]
        ratios = [fmt(m[t]["dm_ratio"].get(field), "x") for t in m if t != "dm"]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    d = summary["diff"]
    mib = diffs["database_bytes"] / MiB
    lines += ["", f"| scenario 2 ({mib:.0f} MiB database) | wall s | CPU s | peak MiB | "
              "dm/peer wall | dm/peer CPU |", "|---|---|---|---|---|---|"]
    if "dm" in d:
        lines.append(f"| `dm diff --data HEAD^ HEAD --json` | {fmt(d['dm']['wall'])} | "
                     f"{fmt(d['dm']['cpu'])} | {fmt(d['dm']['rss_mib'])} | - | - |")
    if "pg_dump + diff" in d:
        p = d["pg_dump + diff"]
        lines.append(f"| 2 x (`dm export`, postgres, `pg_dump`) + `diff -u` | {fmt(p['wall'])} "
                     f"| {fmt(p['cpu'])} | - | {fmt(p.get('dm_ratio'), 'x')} | "
                     f"{fmt(p.get('dm_cpu_ratio'), 'x')} |")
        lines.append(f"| the same without the exports | {fmt(p['wall_without_export'])} | - | - "
                     f"| {fmt(p.get('dm_ratio_without_export'), 'x')} | - |")
    targets: list[tuple[str, str, bool]] = []
    mount_s = m["dm"]["mount_s"]["median"]
    targets.append((f"1a `dm mount` usable < {TARGET_MOUNT_S:.0f} s ({size} MiB)",
                    f"{mount_s:.3f} s", mount_s < TARGET_MOUNT_S))
    small = [r["dm"] for r in mounts["rounds"] if "dm" in r]
    worst = max(x["small_read_rchar"] - x["small_size"] for x in small)
    targets.append((f"1c reading one upload reads only its blocks (server reads <= its size "
                    f"+ {SMALL_SLACK >> 10} KiB of index pages)",
                    f"{worst / 1024:+,.1f} KiB at most", worst <= SMALL_SLACK))
    first = max(x["first_byte_rchar"] for x in small)
    whole = mounts["dataset"]["big_file_size"]
    targets.append(("1b 8 KiB of a database file reads < 1% of the file",
                    f"{first / 1024:,.0f} KiB of {whole / MiB:,.0f} MiB "
                    f"({100 * first / whole:.2f}%)", first < whole / 100))
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**MISSED**'} |" for t, v, ok in targets]
    for tool, why in skipped.items():
        lines.append(f"\n{tool}: skipped ({why})")
    return "\n".join(lines), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="~48 MiB dataset, pgbench scale 1 (~22 MiB), 1 round")
    ap.add_argument("--size-mib", type=int, default=None, help="dataset size (default 2048)")
    ap.add_argument("--pg-scale", type=int, default=None,
                    help="pgbench scale of scenario 2 (default 6: ~100 MiB)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 3)")
    ap.add_argument("--only-dm", action="store_true", help="no restic, borg or pg_dump")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default /var/tmp)")
    args = ap.parse_args()
    args.size = (args.size_mib or (48 if args.small else 2048)) * MiB
    args.pg_scale = args.pg_scale or (1 if args.small else 6)
    args.rounds = args.rounds or (1 if args.small else 3)
    out = args.out or Path(__file__).parent / "results" / (
        "browse-small.json" if args.small else "browse.json")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (FUSE mounts for every user's tools, and "
                         "PostgreSQL as its service user)")
    if not args.only_dm:
        ensure_tools()
    os.environ["DM_DAEMON"] = "off"  # a daemon the user runs must not serve the bench
    base = Path(tempfile.mkdtemp(prefix="dm-browse-bench-", dir=args.workdir or "/var/tmp"))
    skipped: dict[str, str] = {}
    if args.only_dm:
        skipped.update({"restic": "--only-dm", "borg": "--only-dm"})
    try:
        load_before = os.getloadavg()
        mounts = mount_scenario(base, args, skipped)
        diffs = diff_scenario(args, skipped)
        load_after = os.getloadavg()
        summary = summarize(mounts, diffs)
        text, targets = table(summary, mounts, diffs, skipped)
        print(text)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "mount": mounts, "diff": diffs, "summary": summary, "targets": targets,
            "skipped": skipped, "table": text,
            "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                        "loadavg_before": load_before, "loadavg_after": load_after},
        }, indent=2))
        print(f"bench: load average before {load_before}, after {load_after}")
        print(f"bench: results saved to {out}")
    finally:
        mnt = base / "mnt"
        if mnt.exists() and listed(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stdin=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
