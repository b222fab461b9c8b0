"""Dot, subdot and branch names.

``app.clicks-db`` is dot ``app``, subdot ``clicks-db``; a bare ``app`` means the default subdot.
The split is at the first ``.`` so a compose-prefixed ``mobycounter_app.clicks-db`` still works.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dotmesh.errors import InvalidName

DEFAULT_SUBDOT = "__default__"
ROOT_SUBDOT = "__root__"  # in a Docker volume name, DOT.__root__: the whole dot (as Dotmesh's)
LOCAL_NAMESPACE = "admin"  # the one namespace of local dots (Dotmesh's default one)
DEFAULT_BRANCH = "master"
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REF_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
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


def _check_ref_name(name: str, what: str) -> str:
    """Branch and tag names: parts of letters, digits, ``-`` and ``_`` joined by single
    ``/`` (``fix/login``), 64 characters at most; ``HEAD`` is reserved for ref syntax."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be text")
    if not name:
        raise InvalidName(f"{what} must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"{what} {name[:80]!r} is longer than {MAX_NAME} characters")
    if not _REF_NAME.fullmatch(name):
        raise InvalidName(f"{what} {name[:80]!r} may only contain letters, digits, '-' and "
                          "'_', in parts joined by single '/' (fix/login)")
    if name == "HEAD":
        raise InvalidName(f"'HEAD' is reserved and cannot be a {what}")
    return name


def check_branch(name: str) -> str:
    return _check_ref_name(name, "branch name")


def check_tag(name: str) -> str:
    """Tag names follow the branch rules (they are refs too)."""
    return _check_ref_name(name, "tag name")


def ref_key(name: str) -> str:
    """A branch or tag name as one part of a path or a storage key: ``fix/login`` is
    ``fix.login`` (no name holds a ``.``, so no two names meet, and ``fix`` beside
    ``fix/login`` is not a folder holding a branch)."""
    return name.replace("/", ".")


def ref_of_key(key: str) -> str:
    return key.replace(".", "/")


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
            if subdot == ROOT_SUBDOT:
                raise InvalidName(f"subdot name {ROOT_SUBDOT!r} is reserved: as a Docker "
                                  f"volume, {dot}.{ROOT_SUBDOT} is the whole dot")
        else:
            subdot = DEFAULT_SUBDOT
        return cls(dot, subdot)

    def __str__(self) -> str:
        return self.dot if self.subdot == DEFAULT_SUBDOT else f"{self.dot}.{self.subdot}"


@dataclass(frozen=True)
class DockerVolume:
    """A Docker volume name as Dotmesh wrote them: ``[NAMESPACE/]DOT[.SUBDOT][@BRANCH]``.

    ``subdot`` None is ``DOT.__root__``, the whole dot (its subdots as folders); ``branch``
    None follows the dot's current branch, ``@BRANCH`` pins the volume to that branch's
    folders. Local dots have one namespace: ``admin/`` (Dotmesh's default) may be written
    and means nothing more; another namespace is refused, as it would name another dot."""

    dot: str
    subdot: str | None
    branch: str | None = None

    @classmethod
    def parse(cls, text: str) -> DockerVolume:
        if not isinstance(text, str):
            raise InvalidName("a volume name must be text")
        rest, at, branch = text.partition("@")
        ns, slash, after = rest.partition("/")
        if slash and "." not in ns:  # else a bad DOT.SUBDOT, said so below
            rest = after
        if slash and "." not in ns and ns != LOCAL_NAMESPACE:
            raise InvalidName(f"namespace {ns[:80]!r}: local dots have one namespace, "
                              f"{LOCAL_NAMESPACE!r} (name the volume DOT.SUBDOT or "
                              f"{LOCAL_NAMESPACE}/DOT.SUBDOT)")
        dot, sep, subdot = rest.partition(".")
        if sep and subdot == ROOT_SUBDOT:
            whole: str | None = None
            check_name(dot, "dot name")
        else:
            whole = VolumeName.parse(rest).subdot
        if at:
            check_branch(branch)
        return cls(dot, whole, branch if at else None)

    @property
    def key(self) -> str:
        """What follows ``DOT.``: names its mounts (``db``, ``__root__``, ``db@fix``)."""
        return (self.subdot or ROOT_SUBDOT) + (f"@{self.branch}" if self.branch else "")

    def __str__(self) -> str:
        name = (self.dot if self.subdot == DEFAULT_SUBDOT else
                f"{self.dot}.{self.subdot or ROOT_SUBDOT}")
        return name + (f"@{self.branch}" if self.branch else "")
