"""One table of errors: the CLI's exit codes, the hub's statuses and the client's reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dotmesh import errors
from dotmesh.capture.containers import EngineError
from dotmesh.capture.freeze import FreezeTimeout
from dotmesh.capture.hooks import HookFailed
from dotmesh.cli.main import run
from dotmesh.fs.btrfs import SnapshotError
from dotmesh.fs.pool import PoolError
from dotmesh.remote.blobs import StorageError
from dotmesh.remote.transport import Unreachable
from dotmesh.remote.wire import BadTransfer

# (class, exit code, HTTP status): what users and scripts already rely on.
TABLE = [
    (errors.DotmeshError, 1, 500), (errors.UsageError, 2, 400), (errors.InvalidName, 2, 400),
    (errors.TooLarge, 2, 413), (errors.NotFound, 3, 404), (errors.AlreadyExists, 4, 409),
    (errors.Conflict, 5, 409), (errors.Locked, 6, 500), (errors.Corrupt, 7, 422),
    (errors.DamagedIndex, 7, 422), (errors.OutOfSpace, 11, 500), (errors.Unauthorized, 12, 401),
    (errors.Forbidden, 13, 403), (errors.Interrupted, 130, 500), (errors.InternalError, 70, 500),
    (BadTransfer, 7, 422), (StorageError, 11, 503), (Unreachable, 14, 500),
    (FreezeTimeout, 8, 500), (HookFailed, 9, 500), (EngineError, 10, 500),
    (SnapshotError, 15, 500), (PoolError, 15, 500),
]


@pytest.mark.parametrize(("cls", "exit_code", "status"), TABLE,
                         ids=[c.__name__ for c, _, _ in TABLE])
def test_each_error_carries_its_exit_code_and_status(cls: type[errors.DotmeshError],
                                                     exit_code: int, status: int) -> None:
    assert (cls.exit_code, cls.http_status) == (exit_code, status)


def test_every_error_class_is_in_the_table() -> None:
    def all_subclasses(c: type) -> set[type]:
        return {c, *(s for sub in c.__subclasses__() for s in all_subclasses(sub))}

    assert all_subclasses(errors.DotmeshError) == {c for c, _, _ in TABLE}


@pytest.mark.parametrize(("status", "cls"), [
    (400, errors.UsageError), (401, errors.Unauthorized), (403, errors.Forbidden),
    (404, errors.NotFound), (409, errors.Conflict), (413, errors.TooLarge),
    (422, BadTransfer), (500, None), (503, None), (418, None)])
def test_a_client_reads_a_status_back_as_one_error(status: int,
                                                   cls: type[errors.DotmeshError] | None) -> None:
    assert errors.error_for_status(status) is cls


def test_an_answering_class_reads_back_as_itself() -> None:
    for cls, _, status in TABLE:
        back = errors.error_for_status(status)
        assert back is None or back.http_status == status, cls


def test_under_json_an_error_is_one_json_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["--home", str(tmp_path / "h"), "log", "--json"])
    out, err = capsys.readouterr()
    assert code == 3 and out == ""
    [line] = err.splitlines()
    error = json.loads(line)
    assert error.pop("error").startswith("no dotmesh store at")  # and none was made
    assert error == {"type": "NotFound", "exit_code": 3}
    assert not (tmp_path / "h").exists()


def test_without_json_an_error_is_one_line(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["--home", str(tmp_path / "h"), "checkout", "nope"])
    _, err = capsys.readouterr()
    assert code == 3 and err.startswith("dm: error: ") and err.count("\n") == 1


def test_a_bug_is_one_line_with_exit_70(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("dotmesh.ops.dots.init", broken)
    code = run(["--home", str(tmp_path / "h"), "init", "app"])
    _, err = capsys.readouterr()
    assert code == 70 and "internal error: ZeroDivisionError: boom" in err
