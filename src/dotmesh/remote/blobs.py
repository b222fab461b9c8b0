"""Where a hub or an S3 remote keeps its bytes: a flat key -> bytes store.

The contract (one test suite runs it against every implementation):
- ``put`` is atomic (a reader sees all of it or nothing) and idempotent;
- ``get`` reads a value (refusing one over ``limit`` bytes), ``get_range`` part of one
  (never more than asked); NotFound if the key is absent;
- ``list`` returns every key under a prefix, sorted; ``entries`` the same with each value's
  size and when it was written (ns since the epoch);
- ``delete`` removes a key (no error if it is absent already);
- ``read_versioned`` returns a value with a version tag, and ``put_if`` replaces it only if
  the tag still matches (or, with ``None``, only if the key is absent): the compare-and-swap
  that ref updates rely on. It raises :class:`Conflict` otherwise.
Keys are validated: ``/``-separated parts of letters, digits, ``.-_``, never ``..``.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dotmesh.errors import Conflict, DotmeshError, NotFound, UsageError

_PART = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # LocalBlobs.put's file before its rename


class StorageError(DotmeshError):
    """The blob store (a folder or an S3 bucket) failed or refused a request."""

    exit_code = 11
    http_status = 503


def check_key(key: str) -> str:
    parts = key.split("/")
    if not all(_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise UsageError(f"bad storage key {key!r}")
    return key


def _within(data: bytes, limit: int | None, key: str) -> bytes:
    if limit is not None and len(data) > limit:
        raise StorageError(f"{key} is larger than the {limit} bytes it may have")
    return data


@dataclass(frozen=True)
class BlobEntry:
    key: str
    size: int
    written_ns: int  # the store's clock: a file's mtime, an S3 object's LastModified


class Blobs(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str, limit: int | None = None) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def list(self, prefix: str) -> list[str]: ...
    def entries(self, prefix: str) -> builtins.list[BlobEntry]: ...
    def delete(self, key: str) -> None: ...
    def read_versioned(self, key: str, limit: int | None = None
                       ) -> tuple[bytes, str] | None: ...
    def put_if(self, key: str, data: bytes, version: str | None) -> str: ...
    def describe(self) -> str: ...


class LocalBlobs:
    """A folder; values are files written whole, fsynced and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._cas = threading.Lock()  # one process: a lock makes put_if atomic

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove_unfinished(self) -> int:
        """Delete what killed writers left: temporary files of puts that never got renamed.
        Only while no other process puts here (it would lose a put under way). Returns how
        many were deleted."""
        removed = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if _TMP.fullmatch(name):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
        except FileNotFoundError:
            raise NotFound(f"{key} is not in {self.root}") from None
        return _within(data, limit, key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, start)
        except FileNotFoundError:
            raise NotFound(f"{key} is not in {self.root}") from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.startswith("."):
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def entries(self, prefix: str) -> builtins.list[BlobEntry]:
        out = []
        for key in self.list(prefix):
            try:
                st = os.stat(self.root / key)
            except FileNotFoundError:  # deleted since it was listed
                continue
            out.append(BlobEntry(key, st.st_size, st.st_mtime_ns))
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        try:
            data = self.get(key, limit)
        except NotFound:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, version: str | None) -> str:
        with self._cas:
            now = self.read_versioned(key)
            if (now[1] if now else None) != version:
                raise Conflict(f"{key} changed meanwhile")
            self.put(key, data)
            return hashlib.sha256(data).hexdigest()


class S3Blobs:
    """An S3 bucket (any S3 API: AWS, SeaweedFS, MinIO) through boto3. put_if uses
    conditional writes: If-Match with the ETag read, or If-None-Match: * to create."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 prefix: str = "", verify: bool | str = True) -> None:
        import boto3  # noqa: PLC0415 - 300 ms; only S3 users pay it
        from botocore.config import Config  # noqa: PLC0415

        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        self.s3: Any = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, region_name="us-east-1", verify=verify,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, read_timeout=120,
                          s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def describe(self) -> str:
        return f"{self.endpoint}/{self.bucket}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise NotFound(f"{kw.get('Key', '')} is not in {self.describe()}") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                    409, 412):
                raise Conflict(f"{kw.get('Key', '')} changed meanwhile") from None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist at "
                                   f"{self.endpoint}") from None
            raise StorageError(f"S3 {what} failed: {code or status}: "
                               f"{e.response.get('Error', {}).get('Message', '')}") from None
        except BotoCoreError as e:
            raise StorageError(f"S3 {what} at {self.endpoint} failed: {e}") from None

    def put(self, key: str, data: bytes) -> None:
        self._call("put", self.s3.put_object, Key=self._key(key), Body=data)

    def get(self, key: str, limit: int | None = None) -> bytes:
        body = self._call("get", self.s3.get_object, Key=self._key(key))["Body"]
        return _within(bytes(body.read() if limit is None else body.read(limit + 1)), limit,
                       key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        r = self._call("get", self.s3.get_object, Key=self._key(key),
                       Range=f"bytes={start}-{start + length - 1}")
        return bytes(r["Body"].read(length))

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self._pages(self.prefix + prefix):
            out.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        return sorted(out)

    def entries(self, prefix: str) -> builtins.list[BlobEntry]:
        out: builtins.list[BlobEntry] = []
        for page in self._pages(self.prefix + prefix):
            out.extend(BlobEntry(o["Key"][len(self.prefix):], int(o["Size"]),
                                 int(o["LastModified"].timestamp() * 1e9))
                       for o in page.get("Contents", []))
        return sorted(out, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        self._call("delete", self.s3.delete_object, Key=self._key(key))

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        token = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list", self.s3.list_objects_v2, **kw)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def read_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        try:
            r = self._call("get", self.s3.get_object, Key=self._key(key))
        except NotFound:
            return None
        body = r["Body"]
        data = bytes(body.read() if limit is None else body.read(limit + 1))
        return _within(data, limit, key), str(r["ETag"])

    def put_if(self, key: str, data: bytes, version: str | None) -> str:
        cond = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        r = self._call("conditional put", self.s3.put_object, Key=self._key(key), Body=data,
                       **cond)
        return str(r["ETag"])

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create bucket", self.s3.create_bucket)
