"""The seed's app in miniature, used by the demo and the live-capture tests.

Each step inserts row n into PostgreSQL (committed), then sets the Redis counter to n, then
writes uploads/n.bin: any consistent state has counter <= max(n) <= counter + 1.

    python demo/miniapp.py PG_SOCKET_DIR PG_PORT REDIS_SOCKET UPLOADS_DIR
"""

from __future__ import annotations

import os
import socket
import sys

import psycopg


def upload_bytes(n: int) -> bytes:
    return (f"upload {n} ".encode() * (50 + n % 200))[: 1000 + n % 5000]


class Redis:
    """Just enough RESP to SET and GET over a unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""

    def call(self, *args: str) -> bytes:
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            out += f"${len(a.encode())}\r\n{a}\r\n".encode()
        self.sock.sendall(out)
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        line, self.buf = self.buf.split(b"\r\n", 1)
        if line.startswith(b"-"):
            raise RuntimeError(line.decode())
        return line


def main() -> None:
    pg_dir, pg_port, redis_sock, uploads = sys.argv[1:5]
    os.chdir(uploads)  # like an uploads service: its working folder is the subdot
    db = psycopg.connect(host=pg_dir, port=int(pg_port), user="postgres", dbname="postgres",
                         autocommit=True)
    r = Redis(redis_sock)
    n = 0
    while True:
        n += 1
        db.execute("INSERT INTO steps (n, payload) VALUES (%s, %s)", (n, "x" * (n % 300)))
        r.call("SET", "counter", str(n))
        with open(f"{n}.bin", "wb") as f:
            f.write(upload_bytes(n))


if __name__ == "__main__":
    try:
        main()
    except (psycopg.Error, RuntimeError, OSError) as e:
        sys.exit(f"miniapp: stopped: {type(e).__name__}: {str(e).splitlines()[0]}")
