"""Dot, subdot and branch names.

``app.clicks-db`` is dot ``app``, subdot ``clicks-db``; a bare ``app`` means the default subdot.
The split is at the first ``.`` so a compose-prefixed ``mobycounter_app.clicks-db`` still works.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dotmesh.errors import InvalidName

DEFAULT_SUBDOT = "__default__"
DEFAULT_BRANCH = "master"
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_METADATA_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is 1-64 letters, digits, ``-`` or ``_``; raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be text")
    if not _NAME.fullmatch(name):
        if not name:
            raise InvalidName(f"{what} must not be empty")
        if len(name) > MAX_NAME:
            raise InvalidName(f"{what} {name!r} is longer than {MAX_NAME} characters")
        raise InvalidName(f"{what} {name!r} may only contain letters, digits, '-' and '_'")
    return name


def check_metadata_key(key: str) -> str:
    """Commit metadata keys: 1-128 letters, digits and ``_.:/@+-``, starting with a letter or
    digit (``ticket``, ``ci/run-id``); ``dm.`` keys are dotmesh's own."""
    if not _METADATA_KEY.fullmatch(key):
        raise InvalidName(f"metadata key {key[:80]!r} must be 1-128 letters, digits or "
                          "'_.:/@+-', starting with a letter or digit")
    return key


def check_branch(name: str) -> str:
    """Branch names follow the same rules; ``HEAD`` is reserved for ref syntax."""
    check_name(name, "branch name")
    if name == "HEAD":
        raise InvalidName("'HEAD' is reserved and cannot be a branch name")
    return name


def check_tag(name: str) -> str:
    """Tag names follow the branch rules (they are refs too)."""
    check_name(name, "tag name")
    if name == "HEAD":
        raise InvalidName("'HEAD' is reserved and cannot be a tag name")
    return name


@dataclass(frozen=True)
class VolumeName:
    """A parsed ``DOT[.SUBDOT]``."""

    dot: str
    subdot: str

    @classmethod
    def parse(cls, text: str) -> VolumeName:
        dot, sep, subdot = text.partition(".")
        check_name(dot, "dot name")
        if sep:
            check_name(subdot, "subdot name")
        else:
            subdot = DEFAULT_SUBDOT
        return cls(dot, subdot)

    def __str__(self) -> str:
        return self.dot if self.subdot == DEFAULT_SUBDOT else f"{self.dot}.{self.subdot}"
