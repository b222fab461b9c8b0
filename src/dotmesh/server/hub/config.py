"""Where a hub keeps things, from flags or a TOML config file with the same keys:

    data = "/var/lib/dm-hub"          # the embedded default: SQLite and a folder, in here
    db = "postgresql+psycopg://hub@127.0.0.1/hub"   # or a database of its own
    s3 = "KEY:SECRET@http://127.0.0.1:8333/hub"      # and a bucket for the objects
    host = "127.0.0.1"
    port = 8080
    workers = 2                      # processes on the same port (default 1)
    cert = "hub.pem"                 # TLS, with key
    key = "hub.key"

Several ``dm hub serve`` processes with the same ``db`` and ``s3`` serve the same hub.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotmesh.errors import Locked, UsageError
from dotmesh.remote.blobs import LocalBlobs, S3Blobs

if TYPE_CHECKING:
    from dotmesh.server.hub.storage import HubStore

KEYS = ("data", "db", "s3", "host", "port", "cert", "key", "workers")


class HubConfig:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str, default: Any = None) -> Any:
        v = self.values.get(key)
        return default if v is None else v

    def resolved(self) -> dict[str, Any]:
        """The storage settings with defaults filled in (for worker processes)."""
        return {"data": str(self.data()), "db": self.db(), "s3": self.get("s3")}

    def data(self) -> Path:
        return Path(self.get("data") or os.environ.get("DM_HUB_DATA")
                    or Path.home() / ".dotmesh-hub").absolute()

    def db(self) -> str:
        return str(self.get("db") or f"sqlite:///{self.data() / 'hub.db'}")

    def store(self) -> HubStore:
        from dotmesh.server.hub.storage import HubStore  # noqa: PLC0415 - 150 ms of imports

        data = self.data()
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot use {data} for the hub's data: {e.strerror}") from None
        db = self.db()
        spec = self.get("s3")
        if spec:
            from dotmesh.ops.remotes import parse_s3  # noqa: PLC0415

            access, secret, endpoint, bucket = parse_s3(spec)
            s3 = S3Blobs(endpoint, bucket, access, secret, prefix="hub/")
            s3.ensure_bucket()
            return HubStore(db, s3)
        return HubStore(db, LocalBlobs(data / "blobs"))


def hold_serve_lock(data: Path) -> int:
    """Lock ``data`` for this process's lifetime (the fd stays open): a serve that keeps
    objects in the folder deletes temporary files at start, which must not be another live
    serve's. Fails at once, naming the holder."""
    path = data / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Locked(f"another dm hub serve (pid {holder}) serves {data}: stop it first "
                     "(for more processes use --workers)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
