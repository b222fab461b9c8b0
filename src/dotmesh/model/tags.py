"""Tags: names for states worth coming back to (``bug-42``), as stored and as they travel.

A tag names one commit of its dot, with a message, who tagged and when. Tags travel with
their dot (push, pull, clone), so a tag read from a remote is held to the rules a local one
is made with before anything keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dotmesh.errors import InvalidName
from dotmesh.model.ids import ID_LEN, ObjectId
from dotmesh.model.names import check_tag
from dotmesh.model.refspec import looks_like_id_prefix

MAX_MESSAGE = 64 << 10  # characters of a tag's message
MAX_TAGGER = 256
MAX_TAGS = 10_000  # of one dot, as a remote lists them


@dataclass(frozen=True)
class Tag:
    """A name for a commit of a dot (``dm tag``): a state to come back to, kept by gc."""

    name: str
    commit: ObjectId
    message: str
    tagger: str
    ts_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit.hex(), "message": self.message, "tagger": self.tagger,
                "ts_ns": self.ts_ns}

    @classmethod
    def from_json(cls, name: object, obj: object) -> Tag:
        """A tag as a remote states it; InvalidName for anything a local tag could not be."""
        check_new_tag_name(name)  # type: ignore[arg-type]
        assert isinstance(name, str)
        if not isinstance(obj, dict):
            raise InvalidName(f"tag {name} is not described as an object")
        commit, message = obj.get("commit"), obj.get("message")
        tagger, ts_ns = obj.get("tagger"), obj.get("ts_ns")
        raw = b""
        if isinstance(commit, str) and len(commit) == 2 * ID_LEN:
            try:
                raw = bytes.fromhex(commit)
            except ValueError:
                pass
        if len(raw) != ID_LEN:  # fromhex skips spaces: 64 characters may be fewer bytes
            raise InvalidName(f"tag {name} names a malformed commit id")
        if not isinstance(message, str) or not isinstance(tagger, str):
            raise InvalidName(f"tag {name} has a message or tagger that is not text")
        check_tag_fields(message, tagger)
        if type(ts_ns) is not int or not 0 <= ts_ns < 1 << 63:
            raise InvalidName(f"tag {name} has a malformed time")
        return cls(name, ObjectId(raw), message, tagger, ts_ns)


def check_new_tag_name(name: str) -> str:
    """A tag's name: a ref name that no commit id prefix could be (``dm show cafe`` must
    mean one thing)."""
    check_tag(name)
    if looks_like_id_prefix(name):
        raise InvalidName(f"tag name {name!r} looks like a commit id: a ref naming it would "
                          "be ambiguous")
    return name


def check_tag_fields(message: str, tagger: str) -> None:
    if len(message) > MAX_MESSAGE:
        raise InvalidName(f"a tag's message may have {MAX_MESSAGE} characters at most")
    if len(tagger) > MAX_TAGGER:
        raise InvalidName(f"a tagger's name may have {MAX_TAGGER} characters at most")
    if "\0" in message or "\0" in tagger:
        raise InvalidName("a tag's message and tagger may not hold NUL characters")
