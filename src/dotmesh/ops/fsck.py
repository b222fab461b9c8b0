"""``dm fsck``: verify every stored object's hash and that every ref reaches whole history."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dotmesh.errors import DotmeshError
from dotmesh.model.objects import DIR, FILE, HOLE, Commit, FileList, Tree
from dotmesh.ops.home import Home


@dataclass
class FsckReport:
    objects: int = 0
    commits: int = 0
    trees: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(home: Home, progress: Callable[[int], None] | None = None) -> FsckReport:
    report = FsckReport()
    index = dict(home.packs.iter_index())
    report.objects = len(index)

    def verify(item: tuple[bytes, object]) -> str | None:
        oid, loc = item
        try:
            home.packs.verify_located(oid, loc)  # type: ignore[arg-type]
        except DotmeshError as e:
            return str(e).removesuffix("; run dm fsck")
        finally:
            if progress:
                progress(1)
        return None

    with ThreadPoolExecutor(2) as pool:
        report.problems.extend(p for p in pool.map(verify, index.items()) if p)

    seen: set[bytes] = set()

    def need(oid: bytes, what: str) -> bytes | None:
        if oid not in index:
            report.problems.append(f"{what} {oid.hex()[:16]} is missing")
            return None
        try:
            return home.packs.get(oid)
        except DotmeshError as e:
            report.problems.append(f"{what} {oid.hex()[:16]}: {e}")
            return None

    def walk_tree(oid: bytes, where: str) -> None:
        if oid in seen:
            return
        seen.add(oid)
        data = need(oid, f"tree of {where}")
        if data is None:
            return
        report.trees += 1
        try:
            tree = Tree.decode(data)
        except DotmeshError as e:
            report.problems.append(f"tree {oid.hex()[:16]} of {where}: {e}")
            return
        for e in tree.entries:
            if e.kind == DIR and isinstance(e.ref, bytes):
                walk_tree(e.ref, f"{where}/{e.name}")
            elif e.kind == FILE and isinstance(e.ref, bytes):
                if not e.chunked:
                    if e.ref not in index:
                        report.problems.append(f"content of {where}/{e.name} is missing")
                elif e.ref not in seen:
                    seen.add(e.ref)
                    fl = need(e.ref, f"file list of {where}/{e.name}")
                    if fl is None:
                        continue
                    try:
                        chunks = FileList.decode(fl).chunks
                    except DotmeshError as err:
                        report.problems.append(f"file list of {where}/{e.name}: {err}")
                        continue
                    lost = sum(1 for c, _ in chunks if c != HOLE and c not in index)
                    if lost:
                        report.problems.append(f"{lost} chunks of {where}/{e.name} are missing")

    def walk_commit(oid: bytes, where: str) -> None:
        stack = [oid]
        while stack:
            cid = stack.pop()
            if cid in seen:
                continue
            seen.add(cid)
            data = need(cid, f"commit reachable from {where}")
            if data is None:
                continue
            try:
                c = Commit.decode(data)
            except DotmeshError as e:
                report.problems.append(f"commit {cid.hex()[:16]}: {e}")
                continue
            report.commits += 1
            for sub, root in c.subdots.items():
                walk_tree(root.tree, f"{where}:{sub}")
            stack.extend(c.parents)

    for dot in home.dots():
        for branch, head in home.branches(dot).items():
            if head:
                walk_commit(head, f"{dot}@{branch}")
    for dot, old, new, saved in home.conn.execute(
            "SELECT dot, old, new, saved FROM reflog WHERE dot IN (SELECT name FROM dots)"):
        for x in (old, new, saved):
            if x:
                walk_commit(x, f"{dot} reflog")
    for dot in home.dots():
        for (remote, branch), head in home.remote_heads(dot).items():
            walk_commit(head, f"{dot}@{remote}/{branch}")
    return report
