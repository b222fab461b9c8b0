"""Ref syntax: ``HEAD``, ``HEAD^``, ``HEAD~3``, ``master^^``, ``fix/login~2``, ``bug-42~1`` (a tag),
``ab12cd`` (a unique id prefix)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dotmesh.errors import UsageError

_SUFFIX = re.compile(r"(\^+|~\d*)")
MIN_PREFIX = 4


@dataclass(frozen=True)
class RefSpec:
    """A base (``HEAD``, a branch name or an id prefix) and how many first parents to walk back."""

    base: str
    back: int

    @property
    def is_head(self) -> bool:
        return self.base == "HEAD"


def parse_ref(text: str) -> RefSpec:
    """Split ``text`` into base and ancestry depth; raise :class:`UsageError` on bad syntax."""
    m = re.match(r"[A-Za-z0-9_/-]+", text)
    if not m:
        raise UsageError(f"bad ref {text!r}: expected HEAD, a branch, a tag or a commit id")
    base, rest, back = m.group(0), text[m.end():], 0
    pos = 0
    while pos < len(rest):
        s = _SUFFIX.match(rest, pos)
        if not s:
            raise UsageError(f"bad ref {text!r}: cannot parse {rest[pos:]!r} (use ^ or ~N)")
        tok = s.group(0)
        back += len(tok) if tok.startswith("^") else int(tok[1:] or 1)
        pos = s.end()
    return RefSpec(base, back)


def looks_like_id_prefix(text: str) -> bool:
    return len(text) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in text)
