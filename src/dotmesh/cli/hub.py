"""``dm hub``: run a hub, and manage its accounts and collaborators.

Where a hub keeps things comes from flags, or a TOML config file (``server/hub/config.py``):

Several ``dm hub serve`` processes with the same ``db`` and ``s3`` serve the same hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli.context import json_flag
from dotmesh.cli.render import emit_json, iso, table, when
from dotmesh.errors import UsageError
from dotmesh.heap import long_running
from dotmesh.model.names import check_name

if TYPE_CHECKING:
    from dotmesh.server.hub.config import HubConfig

# The hub's modules are imported when a hub command runs, not by every dm command.


def register(cli: click.Group) -> None:
    @cli.group()
    @click.option("--config", type=click.Path(path_type=Path, exists=True), default=None,
                  help="A TOML file with data, db, s3, host, port, cert, key.")
    @click.option("--data", default=None, help="Folder for the embedded SQLite and objects "
                  "(default: $DM_HUB_DATA or ~/.dotmesh-hub).")
    @click.option("--db", default=None, metavar="URL",
                  help="Database URL, e.g. postgresql+psycopg://user@127.0.0.1/hub.")
    @click.option("--s3", default=None, metavar="KEY:SECRET@ENDPOINT/BUCKET",
                  help="Keep objects in this bucket instead of the data folder.")
    @click.pass_context
    def hub(ctx: click.Context, config: Path | None, data: str | None, db: str | None,
            s3: str | None) -> None:
        """Run a hub that people push to and clone from; manage its users.

        \b
        Example:  dm hub user add alice && dm hub serve --port 8080
        """
        import tomllib

        from dotmesh.server.hub.config import KEYS, HubConfig

        values: dict[str, Any] = {}
        if config is not None:
            try:
                values = tomllib.loads(config.read_text())
            except (tomllib.TOMLDecodeError, OSError) as e:
                raise UsageError(f"cannot read {config}: {e}") from None
            unknown = set(values) - set(KEYS)
            if unknown:
                raise UsageError(f"{config}: unknown keys {', '.join(sorted(unknown))}")
        for k, v in (("data", data), ("db", db), ("s3", s3)):
            if v is not None:
                values[k] = v
        ctx.obj = HubConfig(values)

    @hub.command()
    @click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
    @click.option("--port", type=int, default=None, help="Default 8080.")
    @click.option("--cert", type=click.Path(path_type=Path, exists=True), default=None,
                  help="TLS certificate (PEM); with --key.")
    @click.option("--key", type=click.Path(path_type=Path, exists=True), default=None)
    @click.option("--workers", type=click.IntRange(min=1), default=None,
                  help="Processes serving the same port (default 1).")
    @click.pass_obj
    def serve(cfg: HubConfig, host: str | None, port: int | None, cert: Path | None,
              key: Path | None, workers: int | None) -> None:
        """Serve the hub's HTTP API (OpenAPI at /api/v1/openapi.yaml) in the foreground.

        \b
        Example:  dm hub serve --port 8443 --cert hub.pem --key hub.key
        """
        import uvicorn  # noqa: PLC0415

        from dotmesh.remote.blobs import LocalBlobs
        from dotmesh.server.hub import app as hub_app  # noqa: PLC0415 - 150 ms of imports
        from dotmesh.server.hub.config import hold_serve_lock

        cert = cert or cfg.get("cert")
        key = key or cfg.get("key")
        if bool(cert) != bool(key):
            raise UsageError("TLS needs both --cert and --key")
        store = cfg.store()  # checks the storage (and makes the tables) before serving
        store.close()
        if isinstance(store.blobs, LocalBlobs):
            hold_serve_lock(cfg.data())  # until this process ends; workers do not sweep
            removed = store.blobs.remove_unfinished()
            if removed:
                click.echo(f"dm hub: deleted {removed} unfinished temporary files of a "
                           "killed hub", err=True)
        host = host or cfg.get("host", "127.0.0.1")
        port = port or int(cfg.get("port", 8080))
        workers = workers or int(cfg.get("workers", 1))
        scheme = "https" if cert else "http"
        procs = f"{workers} processes" if workers > 1 else "1 process"
        click.echo(f"dm hub: serving {scheme}://{host}:{port} with {procs} "
                   f"(objects in {store.blobs.describe()})", err=True)
        os.environ["DM_HUB_CONFIG"] = json.dumps(cfg.resolved())
        os.environ["DM_HUB_SUPERVISOR"] = str(os.getpid())  # workers end with this process
        factory = f"{hub_app.__name__}:{hub_app.app_from_env.__name__}"  # workers import it
        long_running()
        uvicorn.run(factory, factory=True, workers=workers,
                    host=host, port=port, log_level="warning",
                    ssl_certfile=str(cert) if cert else None,
                    ssl_keyfile=str(key) if key else None)

    @hub.group()
    def user() -> None:
        """Accounts and their API keys.

        \b
        Example:  dm hub user add alice; dm hub user list
        """

    @user.command("add")
    @click.argument("name")
    @json_flag
    @click.pass_obj
    def user_add(cfg: HubConfig, name: str, as_json: bool) -> None:
        """Create an account; prints its API key once (only a hash is kept).

        \b
        Example:  dm hub user add alice
        """
        new = cfg.store().add_user(name)
        if as_json:
            emit_json({"user": name, "api_key": new.key, "key_id": new.id})
        else:
            click.echo(f"Created user {name}. API key (shown once): {new.key}")

    @user.command("key")
    @click.argument("name")
    @json_flag
    @click.pass_obj
    def user_key(cfg: HubConfig, name: str, as_json: bool) -> None:
        """Make another API key for an account.

        \b
        Example:  dm hub user key alice
        """
        new = cfg.store().new_key(name)
        if as_json:
            emit_json({"user": name, "api_key": new.key, "key_id": new.id})
        else:
            click.echo(f"New API key for {name} (shown once, id {new.id}): {new.key}")

    @user.command("list")
    @json_flag
    @click.pass_obj
    def user_list(cfg: HubConfig, as_json: bool) -> None:
        """List the accounts: created, disabled or not, how many keys, dots owned.

        \b
        Example:  dm hub user list --json
        """
        rows = cfg.store().list_users()
        if as_json:
            emit_json([{**{k: v for k, v in u.items() if k != "created_ns"},
                        "created": iso(u["created_ns"])} for u in rows])
            return
        if not rows:
            click.echo("No users yet: dm hub user add NAME")
            return
        table([[u["name"], when(u["created_ns"]), "disabled" if u["disabled"] else "enabled",
                str(u["keys"]), str(len(u["dots"]))] for u in rows],
              ["NAME", "CREATED", "STATUS", "KEYS", "DOTS"])

    @user.command("disable")
    @click.argument("name")
    @json_flag
    @click.pass_obj
    def user_disable(cfg: HubConfig, name: str, as_json: bool) -> None:
        """Refuse every request of an account (401) until it is enabled again; its keys,
        dots and collaborations stay.

        \b
        Example:  dm hub user disable bob
        """
        changed = cfg.store().set_disabled(name, True)
        if as_json:
            emit_json({"user": name, "disabled": True, "changed": changed})
            return
        click.echo(f"Disabled {name}" if changed else f"{name} was already disabled")

    @user.command("enable")
    @click.argument("name")
    @json_flag
    @click.pass_obj
    def user_enable(cfg: HubConfig, name: str, as_json: bool) -> None:
        """Let a disabled account in again, with the keys it had.

        \b
        Example:  dm hub user enable bob
        """
        changed = cfg.store().set_disabled(name, False)
        if as_json:
            emit_json({"user": name, "disabled": False, "changed": changed})
            return
        click.echo(f"Enabled {name}" if changed else f"{name} was not disabled")

    @user.command("rm")
    @click.argument("name")
    @click.option("--with-dots", is_flag=True,
                  help="Also delete the dots the user owns (their branches and who may use "
                  "them), which a later user of the same name would otherwise own.")
    @json_flag
    @click.pass_obj
    def user_rm(cfg: HubConfig, name: str, with_dots: bool, as_json: bool) -> None:
        """Delete an account, its API keys and its collaborations. Refuses while it owns
        dots, unless --with-dots.

        \b
        Example:  dm hub user rm bob --with-dots
        """
        gone = cfg.store().remove_user(name, with_dots)
        if as_json:
            emit_json({"removed": name, "dots": gone})
            return
        click.echo(f"Removed user {name}" + (f" and its dots {', '.join(gone)}" if gone
                                             else ""))

    @hub.group()
    def key() -> None:
        """API keys: list an account's, revoke one (dm hub user key makes one).

        \b
        Example:  dm hub key list alice; dm hub key revoke 3f9c0a1b2c4d
        """

    @key.command("list")
    @click.argument("name", metavar="USER")
    @json_flag
    @click.pass_obj
    def key_list(cfg: HubConfig, name: str, as_json: bool) -> None:
        """List USER's API keys by id (never the keys: only their hashes are kept).

        \b
        Example:  dm hub key list alice --json
        """
        rows = cfg.store().list_keys(name)
        if as_json:
            emit_json([{"id": kid, "created": iso(ns)} for kid, ns in rows])
        elif not rows:
            click.echo(f"{name} has no API keys: dm hub user key {name}")
        else:
            table([[kid, when(ns)] for kid, ns in rows], ["ID", "CREATED"])

    @key.command("revoke")
    @click.argument("kid", metavar="KEY_ID")
    @json_flag
    @click.pass_obj
    def key_revoke(cfg: HubConfig, kid: str, as_json: bool) -> None:
        """Revoke an API key (its id from dm hub key list): the next request with it gets
        401.

        \b
        Example:  dm hub key revoke 3f9c0a1b2c4d
        """
        owner = cfg.store().revoke_key(kid)
        if as_json:
            emit_json({"revoked": kid.strip().lower(), "user": owner})
            return
        click.echo(f"Revoked {owner}'s API key {kid.strip().lower()}")

    @hub.group()
    def collaborator() -> None:
        """Who may read and push a dot besides its owner.

        \b
        Example:  dm hub collaborator add alice/app bob
        """

    @collaborator.command("add")
    @click.argument("dot", metavar="NAMESPACE/DOT")
    @click.argument("name", metavar="USER")
    @click.option("--role", type=click.Choice(["read", "write"]), default="write",
                  show_default=True, help="read: fetch, clone and pull only; write: push too.")
    @json_flag
    @click.pass_obj
    def collaborator_add(cfg: HubConfig, dot: str, name: str, role: str, as_json: bool) -> None:
        """Let USER read (and with --role write, the default, push) NAMESPACE/DOT; a
        collaborator already there gets the new role.

        \b
        Example:  dm hub collaborator add alice/app bob --role read
        """
        ns, dot_name = _dot_arg(dot)
        cfg.store().add_collaborator(ns, dot_name, name, role)
        if as_json:
            emit_json({"dot": f"{ns}/{dot_name}", "added": name, "role": role})
            return
        click.echo(f"{name} may now read and push {dot}" if role == "write" else
                   f"{name} may now read {dot} (not push to it)")

    @collaborator.command("rm")
    @click.argument("dot", metavar="NAMESPACE/DOT")
    @click.argument("name", metavar="USER")
    @json_flag
    @click.pass_obj
    def collaborator_rm(cfg: HubConfig, dot: str, name: str, as_json: bool) -> None:
        """Take USER's access to NAMESPACE/DOT away, from their next request on.

        \b
        Example:  dm hub collaborator rm alice/app bob
        """
        ns, dot_name = _dot_arg(dot)
        cfg.store().remove_collaborator(ns, dot_name, name)
        if as_json:
            emit_json({"dot": f"{ns}/{dot_name}", "removed": name})
            return
        click.echo(f"{name} may no longer read or push {dot}")

    @collaborator.command("list")
    @click.argument("dot", metavar="NAMESPACE/DOT")
    @json_flag
    @click.pass_obj
    def collaborator_list(cfg: HubConfig, dot: str, as_json: bool) -> None:
        """List who may read or push NAMESPACE/DOT besides its owner, and their roles.

        \b
        Example:  dm hub collaborator list alice/app --json
        """
        ns, dot_name = _dot_arg(dot)
        store = cfg.store()
        found = store.dot_for(ns, ns, dot_name)
        roles = store.roles_of([found.id]).get(found.id, {})
        if as_json:
            emit_json({"dot": f"{ns}/{dot_name}", "owner": ns, "collaborators": sorted(roles),
                       "roles": roles})
        elif not roles:
            click.echo(f"{dot} has no collaborators (only {ns} may use it)")
        else:
            table([[u, r] for u, r in roles.items()], ["USER", "ROLE"])


    @hub.group("dot")
    def hub_dot() -> None:
        """The hub's dots (their owners may also delete them over the API: DELETE
        /api/v1/dots/NAMESPACE/DOT).

        \b
        Example:  dm hub dot rm alice/app && dm hub gc
        """

    @hub_dot.command("rm")
    @click.argument("dot", metavar="NAMESPACE/DOT")
    @json_flag
    @click.pass_obj
    def dot_rm(cfg: HubConfig, dot: str, as_json: bool) -> None:
        """Delete a dot: its branches, collaborators and memberships go at once (a push to
        it under way fails); dm hub gc then frees the objects no other dot holds.

        \b
        Example:  dm hub dot rm alice/app
        """
        ns, dot_name = _dot_arg(dot)
        cfg.store().remove_dot(ns, dot_name)
        if as_json:
            emit_json({"deleted": f"{ns}/{dot_name}"})
            return
        click.echo(f"Deleted {ns}/{dot_name}: dm hub gc frees what only it held")

    @hub_dot.command("public")
    @click.argument("dot", metavar="NAMESPACE/DOT")
    @click.option("--off", is_flag=True, help="Make it private again: only its owner and "
                  "collaborators read it.")
    @json_flag
    @click.pass_obj
    def dot_public(cfg: HubConfig, dot: str, off: bool, as_json: bool) -> None:
        """Let anyone read NAMESPACE/DOT, even without an API key (GET requests; pushing
        still takes its owner or a write collaborator).

        \b
        Example:  dm hub dot public alice/app; dm hub dot public alice/app --off
        """
        ns, dot_name = _dot_arg(dot)
        changed = cfg.store().set_public(ns, dot_name, not off)
        state = "private" if off else "public"
        if as_json:
            emit_json({"dot": f"{ns}/{dot_name}", "public": not off, "changed": changed})
            return
        click.echo(f"{dot} is now {state}" if changed else f"{dot} was already {state}")

    @hub.command("gc")
    @click.option("--dry-run", is_flag=True, help="Say what would be freed; change nothing.")
    @click.option("--grace", type=float, default=None, metavar="SECONDS",
                  help="Delete a pack blob only this long after nothing names it any more "
                  "(default 3600: a fetch that found an object in it just before still "
                  "reads it). 0 frees everything at once: only on a hub nobody uses "
                  "meanwhile.")
    @click.option("--repack-below", type=float, default=None, metavar="PERCENT",
                  help="Rewrite pack blobs whose live bytes fill less than this much of "
                  "them (default 50; dm gc's option, in the same unit).")
    @json_flag
    @click.pass_obj
    def hub_gc(cfg: HubConfig, dry_run: bool, grace: float | None,
               repack_below: float | None, as_json: bool) -> None:
        """Free the objects no dot holds (dots deleted, pushes killed midway): plan, then
        apply. Safe while the hub serves pushes and fetches; a killed gc is finished by
        running it again.

        \b
        Example:  dm hub gc --dry-run; dm hub gc
        """
        from dotmesh.cli.render import human_size, progress_bar
        from dotmesh.server.hub import gc

        grace = gc.GRACE if grace is None else grace
        if repack_below is not None and not 0 <= repack_below <= 100:
            raise UsageError(f"--repack-below is a percentage (0-100), not {repack_below}")
        repack_below = gc.REPACK_BELOW if repack_below is None else repack_below / 100
        gc.check_options(grace, repack_below)
        store = cfg.store()
        plan = gc.plan(store, grace, repack_below)
        now_p, now_b = plan.freeing_now()
        later_p, later_b = plan.freeing_later()
        if not as_json:
            click.echo(f"{plan.objects} objects in {plan.packs} packs "
                       f"({human_size(plan.stored)}); {plan.garbage_objects} objects "
                       f"({human_size(plan.garbage_bytes)}) belong to no dot")
            verb = "Would" if dry_run else "Will"
            click.echo(f"{verb} delete {plan.garbage_objects} objects, empty "
                       f"{len(plan.drop)} packs, repack {len(plan.repack)} "
                       f"(copying {human_size(plan.repack_copy)}), remove "
                       f"{len(plan.orphans)} unindexed packs; frees "
                       f"{human_size(max(now_b, 0))} in {now_p} packs now"
                       + (f", {human_size(max(later_b, 0))} in {later_p} packs after "
                          f"the grace period" if later_p else ""))
            if plan.young:
                click.echo(f"{len(plan.young)} unindexed packs are younger than the grace "
                           "period (maybe a push under way): left for a later gc")
        if dry_run:
            if as_json:
                emit_json({"dry_run": True, "plan": plan.to_json()})
            return
        with progress_bar("Collecting", plan.work()) as bar:
            freed = gc.apply(store, plan, bar)
        if as_json:
            emit_json({"dry_run": False, "plan": plan.to_json(), "freed": freed.to_json()})
            return
        click.echo(f"Freed {freed.objects} objects: deleted {freed.packs_deleted} packs "
                   f"({human_size(freed.bytes_deleted)}), repacked {freed.packs_repacked} "
                   f"into {freed.packs_written} (copied {human_size(freed.bytes_copied)})")
        if freed.packs_doomed:
            click.echo(f"{freed.packs_doomed} packs ({human_size(freed.bytes_doomed)}) wait "
                       f"for the grace period: a dm hub gc from {iso(freed.due_ns)} "
                       "deletes them")
        for damaged in freed.damaged:
            click.echo(f"dm hub gc: left a pack it could not read as it is: {damaged}",
                       err=True)


def _dot_arg(text: str) -> tuple[str, str]:
    ns, slash, name = text.partition("/")
    if not slash:
        raise UsageError(f"expected NAMESPACE/DOT, not {text!r}")
    check_name(ns, "namespace")
    check_name(name, "dot name")
    return ns, name
