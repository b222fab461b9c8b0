"""The "polyglot app" dataset and its 1% database-like modification, generated from a seed.

Big database-like files made of 8 KiB pages (incompressible, half-empty and text pages, like
PostgreSQL heap files), a Redis-like dump, and an uploads folder of 1-100 KiB files. Every byte
comes from ``random.Random(seed)``, so two calls with the same arguments give identical trees.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

PAGE = 8192
WORDS = ("user click session id name email created updated true false null logo png "
         "alice bob carol dave eve mallory counter value key timestamp 2026 11 25 ").split()


@dataclass(frozen=True)
class Shape:
    """How big each part is, from one total size."""

    total: int
    db_files: int = 3

    @property
    def db_size(self) -> int:  # each database file, a whole number of pages
        return (int(self.total * 0.78) // self.db_files) // PAGE * PAGE

    @property
    def redis_size(self) -> int:
        return int(self.total * 0.08) + 12345  # not page-aligned: a dump, not a heap

    @property
    def upload_count(self) -> int:
        return max(50, int(5000 * self.total / (2 << 30)))


def _corpus(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += " ".join(rng.choice(WORDS) for _ in range(200)).encode() + b"\n"
    return bytes(out[:size])


def _db_file(path: Path, size: int, rng: random.Random, corpus: bytes) -> None:
    with open(path, "wb") as f:
        batch = bytearray()
        for page in range(size // PAGE):
            kind = rng.random()
            if kind < 0.4:
                batch += rng.randbytes(PAGE)
            elif kind < 0.7:
                used = rng.randint(PAGE * 3 // 10, PAGE * 9 // 10)
                batch += rng.randbytes(used) + bytes(PAGE - used)
            else:
                start = rng.randrange(len(corpus) - PAGE)
                batch += f"page {page:010d} ".encode() + corpus[start:start + PAGE - 16]
            if len(batch) >= 4 << 20:
                f.write(batch)
                batch.clear()
        f.write(batch)


def generate(top: Path, total: int, seed: int = 1) -> dict[str, int]:
    """Write the dataset into ``top`` (created); returns counts for the report."""
    rng = random.Random(seed)
    shape = Shape(total)
    corpus = _corpus(rng, 4 << 20)
    (top / "pg").mkdir(parents=True, exist_ok=True)
    for i in range(shape.db_files):
        _db_file(top / "pg" / f"{16384 + i}", shape.db_size, rng, corpus)
    (top / "redis").mkdir(exist_ok=True)
    with open(top / "redis" / "dump.rdb", "wb") as f:
        written = 0
        while written < shape.redis_size:
            n = min(1 << 20, shape.redis_size - written)
            start = rng.randrange(len(corpus) - n)
            part = corpus[start:start + n // 2] + rng.randbytes(n - n // 2)
            f.write(part)
            written += len(part)
    uploads = top / "uploads"
    uploads.mkdir(exist_ok=True)
    for i in range(shape.upload_count):
        n = rng.randint(1024, 100 * 1024)
        kind = rng.random()
        if kind < 0.5:
            start = rng.randrange(len(corpus) - n)
            data = corpus[start:start + n]
        elif kind < 0.8:
            data = rng.randbytes(n)
        else:
            data = rng.randbytes(n // 2) + bytes(n - n // 2)
        (uploads / f"{i:05d}.{'txt' if kind < 0.5 else 'bin'}").write_bytes(data)
    return {"files": shape.db_files + 1 + shape.upload_count, "bytes": dir_bytes(top)}


def modify(top: Path, total: int, seed: int = 7) -> int:
    """Change about 1% of the bytes like a database would; returns the bytes written."""
    rng = random.Random(seed)
    shape = Shape(total)
    changed = 0
    pages = int(total * 0.0085) // PAGE
    files = [top / "pg" / f"{16384 + i}" for i in range(shape.db_files)]
    fds = [os.open(p, os.O_WRONLY) for p in files]
    try:
        for _ in range(pages):
            fd = rng.choice(fds)
            os.pwrite(fd, rng.randbytes(PAGE), rng.randrange(shape.db_size // PAGE) * PAGE)
            changed += PAGE
    finally:
        for fd in fds:
            os.close(fd)
    uploads = sorted((top / "uploads").iterdir())
    for p in rng.sample(uploads, min(40, len(uploads))):
        n = rng.randint(1024, 4096)
        with open(p, "r+b") as f:
            f.seek(rng.randrange(max(1, p.stat().st_size - n)))
            f.write(rng.randbytes(n))
        changed += n
    for i in range(10):
        n = rng.randint(1024, 100 * 1024)
        (top / "uploads" / f"new-{seed}-{i}.bin").write_bytes(rng.randbytes(n))
        changed += n
    return changed


# A writer that rewrites random 8 KiB pages all over the files named on its command line,
# without pause (the worst case for a file-level capture): ``python -c PAGE_WRITER FILE...``.
PAGE_WRITER = """
import os, random, sys, time
files = sys.argv[1:]
fds = [os.open(f, os.O_WRONLY) for f in files]
sizes = [os.fstat(fd).st_size // 8192 for fd in fds]
rng = random.Random(5)
while True:
    i = rng.randrange(len(fds))
    os.pwrite(fds[i], rng.randbytes(8192), rng.randrange(sizes[i]) * 8192)
    time.sleep(0.0005)
"""


def many_files(top: Path, count: int, seed: int = 3) -> None:
    """``count`` small files in folders of 1,000 (the stat-walk scenario)."""
    rng = random.Random(seed)
    for i in range(count):
        d = top / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(10, 200)))


def dir_bytes(top: Path) -> int:
    """Apparent size of every regular file under ``top``."""
    total = 0
    for dirpath, _, names in os.walk(top):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total
