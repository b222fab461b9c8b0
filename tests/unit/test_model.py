import json

import pytest

from dotmesh.errors import Corrupt, InvalidName, UsageError
from dotmesh.model.ids import HOLE, object_id
from dotmesh.model.names import DEFAULT_SUBDOT, VolumeName, check_branch, ref_key, ref_of_key
from dotmesh.model.objects import DIR, FILE, SYMLINK, Commit, Entry, FileList, Root, Tree
from dotmesh.model.refspec import parse_ref


def test_volume_names_split_at_first_dot():
    assert VolumeName.parse("app.clicks-db") == VolumeName("app", "clicks-db")
    assert VolumeName.parse("mobycounter_app.clicks-db").dot == "mobycounter_app"
    assert VolumeName.parse("app").subdot == DEFAULT_SUBDOT
    assert str(VolumeName.parse("app")) == "app"


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "x" * 65, "app.", "app.a.b", "é", ".x"])
def test_bad_volume_names(bad):
    with pytest.raises(InvalidName):
        VolumeName.parse(bad)


def test_head_is_not_a_branch_name():
    with pytest.raises(InvalidName):
        check_branch("HEAD")


@pytest.mark.parametrize("good", ["fix/login", "a/b/c", "team-1/fix_2", "x" * 64])
def test_branch_names_may_have_parts(good):
    assert check_branch(good) == good
    assert "/" not in ref_key(good) and ref_of_key(ref_key(good)) == good


@pytest.mark.parametrize("bad", ["/x", "x/", "a//b", "a/./b", "a/../b", "..", "a.b", "x" * 65,
                                 "a b/c", "é/x", ""])
def test_bad_branch_names(bad):
    with pytest.raises(InvalidName):
        check_branch(bad)


@pytest.mark.parametrize("text,base,back", [
    ("HEAD", "HEAD", 0), ("HEAD^", "HEAD", 1), ("HEAD^^", "HEAD", 2), ("HEAD~3", "HEAD", 3),
    ("master~2^", "master", 3), ("ab12cd", "ab12cd", 0), ("HEAD~", "HEAD", 1),
    ("fix/login~2", "fix/login", 2),
])
def test_parse_ref(text, base, back):
    spec = parse_ref(text)
    assert (spec.base, spec.back) == (base, back)


@pytest.mark.parametrize("bad", ["", "^", "HEAD^x", "HEAD~x", "a..b", "HEAD@{1}"])
def test_bad_refs(bad):
    with pytest.raises(UsageError):
        parse_ref(bad)


def _tree() -> Tree:
    cid = object_id(b"x")
    return Tree((
        Entry("b.txt", FILE, 0o644, 0, 0, 5, 1, cid),
        Entry("a", DIR, 0o700, 1, 2, 6, 0, object_id(b"t")),
        Entry("l", SYMLINK, 0o777, 0, 0, 7, 0, "../target"),
        Entry("e", FILE, 0o600, 0, 0, 8, 0, None),
        Entry("caf\udce9", FILE, 0o600, 0, 0, 8, 0, None),  # undecodable file name
    ))


def test_tree_roundtrip_is_canonical():
    t = _tree()
    data = t.encode()
    back = Tree.decode(data)
    assert back.encode() == data
    assert {e.name for e in back.entries} == {e.name for e in t.entries}
    shuffled = Tree(tuple(reversed(t.entries)))
    assert object_id(shuffled.encode()) == object_id(data)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "x\x00y", ""])
def test_tree_rejects_unsafe_names(name):
    row = [name, "f", 0o644, 0, 0, 0, 0, None, 0]
    with pytest.raises(Corrupt):
        Tree.decode(b"DMT1\n" + json.dumps([row]).encode())


@pytest.mark.parametrize("payload", [
    b"DMT1\nnot json", b"DMT1\n{}", b"XXXX\n[]", b'DMT1\n[["a","q",0,0,0,0,0,null,0]]',
    b'DMT1\n[["a","f",-1,0,0,0,0,null,0]]', b'DMT1\n[["a","f",420,0,0,0,5,null,0]]',
    b'DMT1\n[["a","f",420,0,0,0,0,null,0],["a","f",420,0,0,0,0,null,0]]',
    b'DMT1\n[["a","f",420,0,0,0,1,"zz",0]]',
])
def test_tree_rejects_malformed(payload):
    with pytest.raises(Corrupt):
        Tree.decode(payload)


def test_filelist_roundtrip_and_size_check():
    fl = FileList(((object_id(b"a"), 10), (HOLE, 8192)))
    assert FileList.decode(fl.encode()) == fl
    assert fl.size == 8202
    with pytest.raises(Corrupt):
        FileList.decode(fl.encode()[:-3])


def test_commit_roundtrip_and_validation():
    c = Commit((object_id(b"p"),), {"db": Root(object_id(b"t"), 0o700, 1, 2, 3)}, "msg",
               "me", 123, {"k": "v"})
    assert Commit.decode(c.encode()) == c
    with pytest.raises(Corrupt):
        Commit.decode(b"DMC1\n{}")
    with pytest.raises(Corrupt):
        Commit.decode(c.encode().replace(b'"mode":448', b'"mode":-1'))
