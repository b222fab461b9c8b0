"""Tags as a remote states them are held to the rules ``dm tag`` makes them with: one badly
made tag refuses the whole answer (tests/integration/test_hostile.py drives two of these
through a clone and a pull from a hostile hub)."""

from __future__ import annotations

import pytest

from dotmesh.model.ids import object_id
from dotmesh.model.tags import MAX_TAGS, Tag
from dotmesh.remote.transport import parse_tags
from dotmesh.remote.wire import BadTransfer

HEAD = object_id(b"a commit").hex()


def _tag(**over: object) -> dict[str, object]:
    return {"commit": HEAD, "message": "shipped", "tagger": "alice", "ts_ns": 5, **over}


def test_a_good_tag_reads_back():
    tag = parse_tags({"release/v1": _tag()}, "hub")["release/v1"]
    assert tag == Tag("release/v1", object_id(b"a commit"), "shipped", "alice", 5)
    assert Tag.from_json("release/v1", tag.to_json()) == tag


@pytest.mark.parametrize("listed,needle", [
    ({"../x": _tag()}, "tag name"),
    ({"a//b": _tag()}, "tag name"),
    ({"HEAD": _tag()}, "reserved"),
    ({"cafe1234": _tag()}, "looks like a commit id"),
    ({"t": _tag(commit="ab" * 31 + " a")}, "malformed commit id"),
    ({"t": _tag(commit=HEAD[:-2])}, "malformed commit id"),
    ({"t": _tag(commit=None)}, "malformed commit id"),
    ({"t": _tag(message="x" * ((64 << 10) + 1))}, "message may have"),
    ({"t": _tag(tagger="x" * 257)}, "tagger's name may have"),
    ({"t": _tag(message="a\0b")}, "NUL"),
    ({"t": _tag(message=5)}, "not text"),
    ({"t": _tag(ts_ns=-1)}, "malformed time"),
    ({"t": _tag(ts_ns=1 << 63)}, "malformed time"),
    ({"t": _tag(ts_ns=True)}, "malformed time"),
    ({"t": _tag(ts_ns=1.5)}, "malformed time"),
    ({"t": "not an object"}, "not described as an object"),
    ({f"t{i}": _tag() for i in range(MAX_TAGS + 1)}, f"over {MAX_TAGS} tags"),
    (["t"], "malformed"),
])
def test_a_badly_made_tag_refuses_the_answer(listed, needle):
    with pytest.raises(BadTransfer, match=needle):
        parse_tags(listed, "the hub")
