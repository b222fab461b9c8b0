"""``dm list --remote HUB``, ``dm log --remote HUB [NS/DOT[@REF]]``, ``dm branch --remote HUB
[NS/DOT]``: a hub's dots and history read over its API, without cloning anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli.render import commit_header, emit_json, first_line, human_size, iso, safe, table

if TYPE_CHECKING:
    from dotmesh.cli.context import Ctx
    from dotmesh.model.ids import ObjectId
    from dotmesh.model.objects import Commit


def list_dots(c: Ctx, remote: str, as_json: bool) -> None:
    found = c.repo.remote_dots(remote)
    if as_json:
        emit_json([d.to_json() for d in found])
        return
    if not found:
        click.echo(f"No dots on {remote} that you may read: push one with dm push {remote}")
        return
    rows = []
    for d in found:
        last = "-"
        if d.last_commit is not None:
            branch, oid, cm = d.last_commit
            last = f"{oid.hex()[:12]} {iso(cm.timestamp_ns)[:16]} {first_line(cm.message)}"
        rows.append([str(d), d.access + (", public" if d.public else ""),
                     str(len(d.branches)), str(d.tags), human_size(d.stored_bytes),
                     ",".join(d.pushers), safe(last)])
    table(rows, ["DOT", "ACCESS", "BRANCHES", "TAGS", "SIZE", "PUSHERS", "LAST COMMIT"])


def _commit_json(oid: ObjectId, cm: Commit) -> dict[str, Any]:
    return {"id": oid.hex(), "parents": [p.hex() for p in cm.parents], "message": cm.message,
            "author": cm.author, "timestamp": iso(cm.timestamp_ns), "metadata": cm.metadata,
            "subdots": sorted(cm.subdots)}


def log(c: Ctx, remote: str, spec: str | None, max_count: int | None, oneline: bool,
        as_json: bool) -> None:
    """``spec``: NAMESPACE/DOT, NAMESPACE/DOT@REF or @REF (the current dot's)."""
    given, _, ref = (spec or "").partition("@")
    entries = c.repo.remote_log(remote, given or None, ref or None, max_count).commits
    if as_json:
        emit_json([_commit_json(oid, cm) for oid, cm in entries])
        return
    if not entries:
        click.echo("No commits")
    for oid, cm in entries:
        if oneline:
            click.echo(f"{oid.hex()[:12]} {safe(first_line(cm.message))}")
        else:
            commit_header(oid, cm)


def branches(c: Ctx, remote: str, given: str | None, as_json: bool) -> None:
    remote_dot, heads = c.repo.remote_branches(remote, given)
    if as_json:
        emit_json([{"name": b, "head": h.hex()} for b, h in sorted(heads.items())])
        return
    if not heads:
        click.echo(f"{remote_dot} has no branches on {remote}")
    for b, h in sorted(heads.items()):
        click.echo(f"  {b} {h.hex()[:12]}")
