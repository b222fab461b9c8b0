"""``dm list/log --remote``'s reading of a hub's JSON: every answer is held to local rules, and
a commit must hash to its id (a fake hub answers, through httpx's MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import Commit, Root
from dotmesh.remote.transport import MAX_JSON_ANSWER, HubTransport
from dotmesh.remote.wire import BadTransfer
from dotmesh.server.hub.browse import commit_json


def _commit(message: str, parents: tuple[ObjectId, ...] = ()) -> tuple[ObjectId, Commit]:
    cm = Commit(parents, {"db": Root(ObjectId(bytes(32)), 0o700, 0, 0, 0)}, message, "ann",
                1_700_000_000_000_000_000, {"ticket": "BUG-42"})
    return object_id(cm.encode()), cm


ONE = _commit("first")
TWO = _commit("second", (ONE[0],))


def _hub(answer: Callable[[httpx.Request], Any]) -> HubTransport:
    t = HubTransport("http://hub.invalid", "ann", "key", "ann/app")
    t.http = httpx.Client(base_url="http://hub.invalid", transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json=answer(r)) if not isinstance(
            a := answer(r), bytes) else httpx.Response(200, content=a)))
    return t


def _summary(**change: Any) -> dict[str, Any]:
    d = {"namespace": "ann", "name": "app", "owner": "ann", "access": "read", "public": False,
         "branches": {"master": TWO[0].hex()}, "tags": 0, "objects": 3, "stored_bytes": 10,
         "raw_bytes": 20, "collaborators": {"ben": "read"}, "pushers": ["ann"],
         "last_commit": {**commit_json(*TWO), "branch": "master"}}
    return {**d, **change}


def test_an_honest_hub_is_read():
    got = _hub(lambda r: {"dots": [_summary()], "next": None}).list_dots()
    assert [str(d) for d in got] == ["ann/app"]
    assert got[0].last_commit == ("master", TWO[0], TWO[1])
    page, following = _hub(lambda r: {"commits": [commit_json(*TWO), commit_json(*ONE)],
                                      "next": None}).log("master", 10)
    assert page == [TWO, ONE] and following is None
    view = _hub(lambda r: {**commit_json(*TWO), "diff": {
        "against": ONE[0].hex(), "truncated": False, "changes": [
            {"subdot": "db", "status": "changed", "path": "d/f", "old_size": 1,
             "new_size": 2}]}}).commit(TWO[0])
    assert view.commit == TWO[1] and view.changes[0].path == "d/f"


@pytest.mark.parametrize("bad", [
    {"name": "../etc"}, {"namespace": 7}, {"access": "admin"}, {"public": "yes"},
    {"branches": {"..": TWO[0].hex()}}, {"tags": -1}, {"stored_bytes": 1.5},
    {"collaborators": {"ben": "god"}}, {"pushers": ["a/b"]},
    {"last_commit": {**commit_json(*TWO), "branch": "master", "message": "forged"}},
    {"last_commit": {**commit_json(*ONE), "branch": "master"}},  # no branch has it
])
def test_a_malformed_list_of_dots_is_refused(bad):
    with pytest.raises(BadTransfer):
        _hub(lambda r: {"dots": [_summary(**bad)], "next": None}).list_dots()


def test_a_malformed_log_is_refused():
    forged = {**commit_json(*ONE), "author": "mallory"}
    for answer in ({"commits": [forged], "next": None},  # does not hash to its id
                   {"commits": [commit_json(*ONE), commit_json(*TWO)], "next": None},  # order
                   {"commits": [commit_json(*TWO)], "next": ONE[0].hex()},  # next not last
                   {"commits": [commit_json(*TWO)] * 3, "next": None},  # over the limit
                   {"commits": "x", "next": None}):
        with pytest.raises(BadTransfer):
            _hub(lambda r, a=answer: a).log("master", 2)


def test_a_malformed_commit_is_refused():
    good = {**commit_json(*TWO), "diff": {"against": ONE[0].hex(), "truncated": False,
                                          "changes": []}}
    for change in ({"diff": {**good["diff"], "against": None}},
                   {"diff": {**good["diff"], "changes": [{
                       "subdot": "db", "status": "changed", "path": "../../x",
                       "old_size": 0, "new_size": 0}]}},
                   {"diff": {**good["diff"], "changes": [{
                       "subdot": "db", "status": "gone", "path": "x",
                       "old_size": 0, "new_size": 0}]}},
                   {"id": ONE[0].hex()}):
        with pytest.raises(BadTransfer):
            _hub(lambda r, c=change: {**good, **c}).commit(TWO[0])


def test_an_endless_answer_is_cut_off():
    huge = b'{"dots": [' + b" " * (MAX_JSON_ANSWER + 1) + b"]}"
    with pytest.raises(BadTransfer, match="more than"):
        _hub(lambda r: huge).list_dots()
    assert json.loads(json.dumps(_summary()))  # the fake's own answers are JSON


def test_a_hub_that_lists_a_dot_again_is_refused():
    """A hub answering each page with the same dots and a next page never ends otherwise."""
    with pytest.raises(BadTransfer, match="twice"):
        _hub(lambda r: {"dots": [_summary()], "next": "ann/app"}).list_dots()
