"""``dm tag``: names for states worth coming back to (``bug-42``), usable wherever a ref is."""

from __future__ import annotations

import click

from dotmesh.cli.context import Ctx, json_flag, pass_ctx
from dotmesh.cli.render import emit_json, first_line, iso, safe, table, when
from dotmesh.errors import UsageError


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("name", required=False)
    @click.argument("ref", required=False)
    @click.option("-m", "--message", default="", help="Why this state matters.")
    @click.option("-f", "--force", is_flag=True, help="Move NAME if it is a tag already.")
    @click.option("-d", "--delete", is_flag=True, help="Delete the tag NAME (not its commit).")
    @json_flag
    @pass_ctx
    def tag(c: Ctx, name: str | None, ref: str | None, message: str, force: bool,
            delete: bool, as_json: bool) -> None:
        """Name the commit REF (default HEAD) NAME, or with no NAME list the current dot's
        tags. A tag works wherever a ref does (dm checkout -b fix bug-42, dm ls bug-42:db)
        and keeps its commit from gc.

        \b
        Example:  dm tag bug-42 -m "the user who cannot log in"
                  dm tag            # list them
                  dm tag -d bug-42
        """
        dot = c.dot()
        if delete:
            if name is None or ref is not None:
                raise UsageError("dm tag -d takes one tag name")
            gone = dot.delete_tag(name)
            if as_json:
                emit_json({"deleted": name, "commit": gone.commit.hex()})
            else:
                click.echo(f"Deleted tag {name} (was {gone.commit.hex()[:12]})")
            return
        if name is None:
            if message or force:
                raise UsageError("-m and -f are for making a tag: dm tag NAME [REF]")
            tags = dot.tags()
            if as_json:
                emit_json([{"name": t.name, "commit": t.commit.hex(), "message": t.message,
                            "tagger": t.tagger, "timestamp": iso(t.ts_ns)}
                           for t in tags.values()])
                return
            if not tags:
                click.echo("No tags yet: name a state with dm tag NAME [REF]")
                return
            table([[safe(t.name), t.commit.hex()[:12], when(t.ts_ns),
                    safe(first_line(t.message))] for t in tags.values()],
                  ["TAG", "COMMIT", "TAGGED", "MESSAGE"])
            return
        made = dot.tag(name, ref or "HEAD", message, force)
        if as_json:
            emit_json({"name": name, "commit": made.commit.hex()})
        else:
            click.echo(f"Tagged {made.commit.hex()[:12]} {name}")


__all__ = ["register"]
