"""Every error a user can meet, each with its exit code and its HTTP status.

Each class carries both numbers, so the CLI (exit codes), the hub (answers) and the hub
client (turning answers back into errors) read one table. Errors live near their code: the
general ones are here, the ones only one layer raises are defined there (``FreezeTimeout``
in ``capture/freeze.py``, ``BadTransfer`` in ``remote/wire.py``...), subclassing these.

=================  ====  ====  ==============================================
class              exit  HTTP  meaning
=================  ====  ====  ==============================================
DotmeshError          1   500  any expected failure
UsageError            2   400  a malformed request (bad flag value, bad name)
TooLarge              2   413  over a size limit of the format
NotFound              3   404  no such dot, branch, subdot, commit or object
AlreadyExists         4   409  the name is taken
Conflict              5   409  would lose data or contradict state
Locked                6   500  another dm holds the dot's lock
Corrupt               7   422  stored or received data failed verification
OutOfSpace           11   500  the disk is full; nothing was recorded
Unauthorized         12   401  no API key, or an unknown one
Forbidden            13   403  a valid key that may not do this
Interrupted         130   500  stopped by the user (Ctrl-C)
InternalError        70   500  a bug
=================  ====  ====  ==============================================

A hub client turns a status back into the class declared with ``answers_status=True`` for
it (``error_for_status``): 409 means Conflict, 422 BadTransfer.

The CLI catches :class:`DotmeshError` in one place and prints ``dm: error: <message>`` (one
JSON line under ``--json``); anything else is a bug. Messages say what went wrong and, where
there is one, what to do next.
"""

from __future__ import annotations

from typing import Any, ClassVar

_ANSWERS: dict[int, type[DotmeshError]] = {}


class DotmeshError(Exception):
    """Base of all expected failures."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500

    def __init_subclass__(cls, *, answers_status: bool = False, **kwargs: Any) -> None:
        """``answers_status``: a client raises this class for an answer with its status."""
        super().__init_subclass__(**kwargs)
        if answers_status:
            _ANSWERS[cls.http_status] = cls


def error_for_status(status: int) -> type[DotmeshError] | None:
    """The error a hub's answer with ``status`` stands for; None for statuses no error has."""
    return _ANSWERS.get(status)


class UsageError(DotmeshError, answers_status=True):
    """The user asked for something malformed (a bad flag value, a bad name)."""

    exit_code = 2
    http_status = 400


class InvalidName(UsageError):
    """A dot, subdot or branch name breaks the naming rules."""


class NotFound(DotmeshError, answers_status=True):
    """A dot, branch, subdot, commit or object that does not exist."""

    exit_code = 3
    http_status = 404


class AlreadyExists(DotmeshError):
    """Creating something whose name is taken."""

    exit_code = 4
    http_status = 409


class Conflict(DotmeshError, answers_status=True):
    """The operation would lose data or contradict state; the message says how to proceed."""

    exit_code = 5
    http_status = 409


class Locked(DotmeshError):
    """Another dm process holds the dot's lock."""

    exit_code = 6


class Corrupt(DotmeshError):
    """Stored data failed verification; run ``dm fsck``."""

    exit_code = 7
    http_status = 422


class TooLarge(UsageError, answers_status=True):
    """Something over one of the size limits of dotmesh's format (docs/format.md)."""

    http_status = 413


class OutOfSpace(DotmeshError):
    """The disk is full; nothing was recorded, and the store works again once there is room."""

    exit_code = 11


class DamagedIndex(Corrupt):
    """``meta.db`` cannot be read; ``dm fsck --repair`` rebuilds it from the packs."""


class Unauthorized(DotmeshError, answers_status=True):
    """No API key, or one the hub does not know; the message says how to give one."""

    exit_code = 12
    http_status = 401


class Forbidden(DotmeshError, answers_status=True):
    """The API key is valid but may not do this (not the owner or a collaborator)."""

    exit_code = 13
    http_status = 403


class Interrupted(DotmeshError):
    """The user stopped the command (Ctrl-C); what it did so far is finished or undone by the
    next command."""

    exit_code = 130


class InternalError(DotmeshError):
    """A bug: an exception no layer expected."""

    exit_code = 70
