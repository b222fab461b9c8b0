"""Commands that give space back: ``dm gc``, ``dm reflog expire``, ``dm branch -d/-D``.

``dm branch`` and ``dm reflog`` are defined in cli/main.py (listing); :func:`register` puts
their deleting and expiring forms beside them without touching them: ``dm reflog`` becomes a
group whose bare form is the listing, and ``dm branch`` gains ``-d``/``-D``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli.context import Ctx, json_flag, pass_ctx
from dotmesh.cli.render import emit_json, human_size, progress_bar, table
from dotmesh.errors import UsageError

if TYPE_CHECKING:  # the ops are imported by the commands that run them (start-up time)
    from dotmesh.ops import du as du_ops
    from dotmesh.ops import gc as gc_ops

# Shown by --help, which loads no store code; tests/unit/test_gc.py pins them to ops/gc.py's.
REPACK_BELOW = 80
REFLOG_EXPIRE_DAYS = ("gc.reflog-expire-days", 30)


def _plan_json(r: gc_ops.GcResult) -> dict[str, Any]:
    p = r.plan
    return {"dry_run": not r.applied,
            "objects": {"indexed": p.objects, "live": p.live, "unreachable": p.dead},
            "packs": {"total": len(p.packs), "deleted": p.count("delete"),
                      "repacked": p.count("repack"), "cut": p.count("cut"),
                      "orphans": p.orphans, "busy": p.count("busy")},
            "bytes": {"before": p.before, "after": r.stored_after,
                      "freed": p.before - r.stored_after, "copied": p.copied}}


def _describe(p: gc_ops.Plan) -> str:
    parts = [f"{p.dead} of {p.objects} objects unreachable"]
    for n, what in ((p.count("delete"), "packs to delete"),
                    (p.count("repack"), "to repack"), (p.count("cut"), "to cut"),
                    (p.orphans, "of them left by killed commands"),
                    (p.count("busy"), "busy (being written)")):
        if n:
            parts.append(f"{n} {what}")
    return "; ".join(parts)


@click.command()
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be freed.")
@click.option("--repack-below", type=click.IntRange(0, 100), default=REPACK_BELOW,
              show_default=True, metavar="PERCENT",
              help="Rewrite a pack file whose live objects fill less than this much of it.")
@json_flag
@pass_ctx
def gc(c: Ctx, dry_run: bool, repack_below: int, as_json: bool) -> None:
    """Free the space of objects no ref reaches any more, and what killed commands left.

    Everything reachable from a branch, a tag, a mounted commit (dm mount), the reflog, an
    unfinished restore, a remote's last seen head, a kept snapshot or a stat cache stays.
    dm gc needs the store to itself: it is refused (exit 6) while another dm command changes
    a dot, and commands that change a dot are refused while it runs; reads (log, diff,
    branch, list) go on. Killed at any moment, it loses nothing; run it again to finish.

    \b
    Example:  dm gc --dry-run
              dm dot delete -f old-app && dm gc
    """
    said: list[str] = []

    def planned(p: gc_ops.Plan) -> None:
        if as_json:
            return
        said.append(f"{'Would free' if dry_run else 'Will free'} "
                    f"{human_size(max(0, p.before - p.after))} of {human_size(p.before)}: "
                    + _describe(p))
        click.echo(said[-1])

    with progress_bar("Marking") as marking, progress_bar("Sweeping") as sweeping:
        r = c.repo.gc(dry_run, repack_below, marking, sweeping, planned)
    if as_json:
        emit_json(_plan_json(r))
    elif r.applied:
        click.echo(f"Freed {human_size(max(0, r.plan.before - r.stored_after))}: "
                   f"{human_size(r.stored_after)} stored in packs now")


@click.command("expire")
@click.option("--days", type=click.IntRange(min=0), default=None, metavar="DAYS",
              help="Keep entries younger than this (default: the setting "
                   f"{REFLOG_EXPIRE_DAYS[0]}, {REFLOG_EXPIRE_DAYS[1]}"
                   " unless changed with dm config).")
@click.option("-n", "--dry-run", is_flag=True, help="Only count them.")
@json_flag
@pass_ctx
def reflog_expire(c: Ctx, days: int | None, dry_run: bool, as_json: bool) -> None:
    """Forget old reflog entries of every dot, with the discarded states only they name
    (dm gc then frees them).

    \b
    Example:  dm reflog expire            # entries older than 30 days
              dm config gc.reflog-expire-days 90
              dm reflog expire --days 0 && dm gc   # everything no branch holds
    """
    n = c.repo.expire_reflog(days, dry_run)
    if as_json:
        emit_json({"expired": n, "dry_run": dry_run})
    else:
        click.echo(f"{'Would forget' if dry_run else 'Forgot'} {n} reflog entries")


@click.command()
@click.argument("dots", nargs=-1, metavar="[DOT]...")
@click.option("--no-gc", is_flag=True, help="Do not work out what dm gc would free (faster).")
@json_flag
@pass_ctx
def du(c: Ctx, dots: tuple[str, ...], no_gc: bool, as_json: bool) -> None:
    """Show where the store's disk went: per dot, per branch and per subdot, the size of its
    newest state (LOGICAL), the bytes in packs its history reaches (STORED), what only it
    reaches (UNIQUE: what deleting it and dm gc would free) and what another dot shares.

    \b
    Example:  dm du
              dm du app --json
    """
    with progress_bar("Reading", unit="objects") as bar:
        r = c.repo.du(list(dots), bar, not no_gc)
    if as_json:
        def one(u: du_ops.Usage) -> dict[str, Any]:
            return {"name": u.name, "logical": u.logical, "stored": u.stored,
                    "unique": u.unique, "shared": u.shared}

        emit_json({"dots": [{**one(u), "branches": [one(b) for b in u.branches],
                             "subdots": [one(s) for s in u.subdots]} for u in r.dots],
                   "packs": r.packs,
                   "reclaimable": r.reclaimable if (r.reclaimable or 0) >= 0 else None})
        return
    rows = []
    for u in r.dots:
        rows.append([u.name, *_sizes(u)])
        rows += [[f"  branch {b.name}", *_sizes(b)] for b in u.branches]
        rows += [[f"  subdot {s.name}", *_sizes(s)] for s in u.subdots]
    if rows:
        table(rows, ["DOT", "LOGICAL", "STORED", "UNIQUE", "SHARED"])
    if r.reclaimable is None:
        gc_note = ""
    elif r.reclaimable >= 0:
        gc_note = f"; dm gc would free {human_size(r.reclaimable)}"
    else:
        gc_note = "; what dm gc would free is unknown: the store is damaged (dm fsck)"
    click.echo(f"{human_size(r.packs)} in pack files{gc_note}")


def _sizes(u: Any) -> list[str]:
    return [human_size(u.logical), human_size(u.stored), human_size(u.unique),
            human_size(u.shared)]


def _reflog_group(listing: click.Command) -> click.Group:
    """``dm reflog`` as before, with subcommand ``expire``."""

    @click.pass_context
    def callback(ctx: click.Context, /, **kwargs: Any) -> None:
        if ctx.invoked_subcommand is None:
            ctx.invoke(listing, **kwargs)

    also = ("\n\n\b\nAlso:\n  dm reflog expire --days 30   # forget older entries (dm "
            "reflog expire --help)")
    group = click.Group("reflog", commands={"expire": reflog_expire}, callback=callback,
                        params=listing.params, invoke_without_command=True,
                        help=inspect.cleandoc(listing.help or "") + also,
                        short_help=listing.short_help)
    return group


def _branch_command(listing: click.Command) -> click.Command:
    """``dm branch`` as before, with ``-d``/``-D NAME``."""

    @pass_ctx
    def callback(c: Ctx, /, delete: str | None, force_delete: str | None,
                 **kwargs: Any) -> None:
        if delete and force_delete:
            raise UsageError("give -d or -D, not both")
        name = delete or force_delete
        if name is None:
            click.get_current_context().invoke(listing, **kwargs)
            return
        head = c.dot().delete_branch(name, force=force_delete is not None)
        if kwargs.get("as_json"):
            emit_json({"deleted": name, "head": head.hex() if head else None})
            return
        at = f" (was {head.hex()[:12]}; dm reflog names it until it expires)" if head else ""
        click.echo(f"Deleted branch {name}{at}")

    params = [click.Option(["-d", "delete"], metavar="NAME",
                           help="Delete branch NAME; refused if its head is in no other "
                                "branch or its folders hold changes not committed."),
              click.Option(["-D", "force_delete"], metavar="NAME",
                           help="Delete branch NAME, merged or not, with its folders."),
              *listing.params]
    return click.Command("branch", callback=callback, params=params,
                         help="List the current dot's branches (* marks the current one), "
                              "or delete one (not the current one).\n\n\b\nExample:  dm "
                              "branch\n          dm branch -d experiment\n          dm "
                              "branch -D spike   # unmerged work too",
                         short_help=listing.short_help)


def register(cli: click.Group) -> None:
    cli.add_command(gc)
    cli.add_command(du)
    cli.add_command(_reflog_group(cli.commands["reflog"]))
    cli.add_command(_branch_command(cli.commands["branch"]))
