"""Every error a user can meet, each with its exit code.

The CLI catches :class:`DotmeshError` in one place and prints ``dm: error: <message>``; anything
else is a bug. Messages say what went wrong and, where there is one, what to do next.
"""

from __future__ import annotations


class DotmeshError(Exception):
    """Base of all expected failures."""

    exit_code = 1


class UsageError(DotmeshError):
    """The user asked for something malformed (a bad flag value, a bad name)."""

    exit_code = 2


class InvalidName(UsageError):
    """A dot, subdot or branch name breaks the naming rules."""


class NotFound(DotmeshError):
    """A dot, branch, subdot, commit or object that does not exist."""

    exit_code = 3


class AlreadyExists(DotmeshError):
    """Creating something whose name is taken."""

    exit_code = 4


class Conflict(DotmeshError):
    """The operation would lose data or contradict state; the message says how to proceed."""

    exit_code = 5


class Locked(DotmeshError):
    """Another dm process holds the dot's lock."""

    exit_code = 6


class Corrupt(DotmeshError):
    """Stored data failed verification; run ``dm fsck``."""

    exit_code = 7


class TooLarge(UsageError):
    """Something over one of the size limits of dotmesh's format (docs/format.md)."""


class OutOfSpace(DotmeshError):
    """The disk is full; nothing was recorded, and the store works again once there is room."""

    exit_code = 11


class DamagedIndex(Corrupt):
    """``meta.db`` cannot be read; ``dm fsck --repair`` rebuilds it from the packs."""


class Unauthorized(DotmeshError):
    """No API key, or one the hub does not know; the message says how to give one."""

    exit_code = 12


class Forbidden(DotmeshError):
    """The API key is valid but may not do this (not the owner or a collaborator)."""

    exit_code = 13
