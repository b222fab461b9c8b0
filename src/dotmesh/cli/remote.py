"""``dm remote``, ``dm s3 remote``, ``dm push``, ``dm pull`` and ``dm clone``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dotmesh.cli.context import Ctx, json_flag, pass_ctx
from dotmesh.cli.render import emit_json, human_size, progress_bar, safe
from dotmesh.errors import Conflict, UsageError

if TYPE_CHECKING:
    from dotmesh.ops import sync

# The commands reach the network code (transports, the wire format, httpx) through the Python
# API, which imports it when a command runs: the other commands do not pay for it.


def _secret(path: Path | None, env: str, what: str, how: str) -> str:
    """From a file, else the environment, else asked for on a terminal (never echoed)."""
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise UsageError(f"no {what}: give {how}")
    return str(click.prompt(what[0].upper() + what[1:], hide_input=True))


def _api_key(key_file: Path | None) -> str:
    return _secret(key_file, "DM_API_KEY", "API key", "--api-key-file FILE or set DM_API_KEY")


stash_flag = click.option(
    "--stash-on-divergence", "stash", is_flag=True,
    help="When both sides have new commits, keep the receiving side's head on a new branch "
         "stash/BRANCH-ID and go on (as Dotmesh did): a push keeps the remote's there, a "
         "pull keeps yours here and takes the remote's.")

same_owner_flag = click.option(
    "--same-owner", is_flag=True,
    help="Restore owners and setuid/setgid/sticky bits as the pusher recorded them (by "
         "default, as tar does for archives from elsewhere, files belong to you and those "
         "bits are dropped); remembered for the dot.")


def register(cli: click.Group) -> None:
    @cli.group(invoke_without_command=True)
    @click.option("-v", "--verbose", is_flag=True, help="Show where each remote is.")
    @json_flag
    @click.pass_context
    def remote(ctx: click.Context, verbose: bool, as_json: bool) -> None:
        """List remotes (* marks the default), or add, remove or switch them.

        \b
        Example:  dm remote add hub alice@hub.example.com && dm remote -v
        """
        if ctx.invoked_subcommand is not None:
            return
        repo = ctx.find_object(Ctx).repo  # type: ignore[union-attr]
        default = repo.default_remote()
        found = repo.remotes()
        if as_json:
            emit_json([{"name": r.name, "kind": r.kind, "url": r.url, "user": r.user or None,
                        "bucket": r.options.get("bucket"), "default": r.name == default}
                       for r in found])
            return
        for r in found:
            mark = "*" if r.name == default else " "
            click.echo(f"{mark} {r.name}" + (f"\t{r.describe()}" if verbose else ""))
        if not found:
            click.echo("No remotes: add one with dm remote add NAME USER@HOST")

    @remote.command("add")
    @click.argument("name")
    @click.argument("address", metavar="[USER@]HOST[:PORT]")
    @click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
                  help="Read the API key from this file (else $DM_API_KEY, else asked).")
    @click.option("--http", "plain", is_flag=True, help="Plain HTTP (default: HTTPS).")
    @click.option("--ca-cert", type=click.Path(path_type=Path, exists=True), default=None,
                  help="Trust the hub's certificate from this CA file.")
    @json_flag
    @pass_ctx
    def remote_add(c: Ctx, name: str, address: str, api_key_file: Path | None, plain: bool,
                   ca_cert: Path | None, as_json: bool) -> None:
        """Add a hub as a remote; the API key is checked with the hub first. Without
        USER@, no key is asked for or sent: the remote clones and pulls public dots only.

        \b
        Example:  DM_API_KEY=dmk_... dm remote add hub alice@127.0.0.1:8080 --http
                  dm remote add pub 127.0.0.1:8080 --http && dm clone pub alice/demo
        """
        r, who = c.repo.add_hub(name, address, lambda: _api_key(api_key_file), plain, ca_cert)
        if as_json:
            emit_json({"name": r.name, "kind": r.kind, "url": r.url, "user": who or None})
            return
        if r.anonymous:
            click.echo(f"Added remote {r.name} ({r.describe()}): dm clone {r.name} "
                       "NAMESPACE/DOT clones a public dot")
            return
        click.echo(f"Added remote {r.name} ({r.describe()}), signed in as {who}")

    @remote.command("rm")
    @click.argument("name")
    @json_flag
    @pass_ctx
    def remote_rm(c: Ctx, name: str, as_json: bool) -> None:
        """Forget a remote and its key.

        \b
        Example:  dm remote rm hub
        """
        c.repo.remove_remote(name)
        if as_json:
            emit_json({"removed": name})
            return
        click.echo(f"Removed remote {name}")

    @remote.command("switch")
    @click.argument("name")
    @json_flag
    @pass_ctx
    def remote_switch(c: Ctx, name: str, as_json: bool) -> None:
        """Make NAME the remote that push, pull and clone use by default.

        \b
        Example:  dm remote switch hub
        """
        c.repo.switch_remote(name)
        if as_json:
            emit_json({"default": name})
            return
        click.echo(f"Default remote is now {name}")

    @cli.group()
    def s3() -> None:
        """S3 buckets as remotes."""

    @s3.group("remote")
    def s3_remote() -> None:
        """Add an S3 bucket as a remote."""

    @s3_remote.command("add")
    @click.argument("name")
    @click.argument("spec", metavar="ACCESS_KEY@ENDPOINT/BUCKET")
    @click.option("--secret-key-file", type=click.Path(path_type=Path), default=None,
                  help="Read the secret key from this file (else $DM_S3_SECRET_KEY, else "
                       "asked for).")
    @json_flag
    @pass_ctx
    def s3_remote_add(c: Ctx, name: str, spec: str, secret_key_file: Path | None,
                      as_json: bool) -> None:
        """Add a bucket as a remote (the endpoint may start with http:// or https://).

        The secret key is read from a file, $DM_S3_SECRET_KEY or the terminal, never from
        the command line, where every local user could see it.

        \b
        Example:  DM_S3_SECRET_KEY=... dm s3 remote add backup AKIA...@http://127.0.0.1:8333/dots
        """
        r = c.repo.add_s3(name, spec, lambda: _secret(
            secret_key_file, "DM_S3_SECRET_KEY", "S3 secret key",
            "--secret-key-file FILE or set DM_S3_SECRET_KEY"))
        if as_json:
            emit_json({"name": r.name, "kind": r.kind, "url": r.url,
                       "bucket": r.options.get("bucket")})
            return
        click.echo(f"Added remote {r.name} ({r.describe()})")

    @cli.command()
    @click.argument("remote_name", metavar="[REMOTE]", required=False)
    @click.argument("dot", required=False)
    @click.argument("branch_arg", metavar="[BRANCH]", required=False)
    @click.option("--branch", default=None,
                  help="The branch to send, as BRANCH (default: the dot's current one).")
    @click.option("--remote-name", "remote_dot", default=None, metavar="NAMESPACE/DOT",
                  help="The dot's name on the remote (default: USER/DOT, or as before).")
    @click.option("-f", "--force", is_flag=True,
                  help="Replace the remote branch even if it has commits yours lacks, and "
                       "move the remote's tags that name other commits than yours.")
    @click.option("--no-tags", is_flag=True, help="Send the branch alone, not the dot's tags.")
    @stash_flag
    @json_flag
    @pass_ctx
    def push(c: Ctx, remote_name: str | None, dot: str | None, branch_arg: str | None,
             branch: str | None, remote_dot: str | None, force: bool, no_tags: bool,
             stash: bool, as_json: bool) -> None:
        """Send a branch's commits to a remote, with the dot's tags (dm tag) and the
        commits they name; only what the remote lacks travels.

        If the remote's branch has commits yours lacks, the push is refused; --force
        replaces them, --stash-on-divergence first keeps them on a new branch on the
        remote (stash/BRANCH-ID, printed), so nothing is lost there.

        \b
        Example:  dm push hub --remote-name alice/app
                  dm push hub app fix/login --no-tags
                  dm push --stash-on-divergence
        """
        if branch_arg and branch and branch_arg != branch:
            raise UsageError(f"two branches to push: {branch_arg} and --branch {branch}")
        branch = branch_arg or branch
        with progress_bar("Pushing") as bar:
            res = c.dot(dot).push(remote_name, branch, force, not no_tags, remote_dot, bar,
                                  bar.total, stash)
        _report(res, as_json, "sent")

    @cli.command()
    @click.argument("remote_name", metavar="[REMOTE]", required=False)
    @click.argument("dot", required=False)
    @click.argument("branch", required=False)
    @click.option("--stop-writers", is_flag=True,
                  help="Stop what uses the folders of a branch that moves: processes on the "
                       "checked-out branch's, containers pinned to a branch (@BRANCH; started "
                       "again on the pulled state).")
    @click.option("--remote-name", "remote_dot", default=None, metavar="NAMESPACE/DOT",
                  help="The dot's name on the remote (default: as before, or USER/DOT); "
                       "remembered.")
    @click.option("--all", "all_branches", is_flag=True,
                  help="Every branch of the remote dot: missing ones are created, the "
                       "others fast-forwarded; one report each.")
    @stash_flag
    @same_owner_flag
    @json_flag
    @pass_ctx
    def pull(c: Ctx, remote_name: str | None, dot: str | None, branch: str | None,
             stop_writers: bool, remote_dot: str | None, all_branches: bool, stash: bool,
             same_owner: bool, as_json: bool) -> None:
        """Fetch a branch's new commits from a remote and fast-forward to them; the
        remote's tags that this dot lacks come too.

        If both sides have new commits, the pull is refused (the remote's state is
        fetched; the message says how to keep yours); with --stash-on-divergence your
        head is kept on a new branch stash/BRANCH-ID (printed) and the branch takes the
        remote's state, the working state it replaces saved as dm reset saves it. With
        --all, a branch that cannot move is reported and the others move (exit 5).

        \b
        Example:  dm pull hub app master
                  dm pull hub --remote-name alice/app
                  dm pull --all --json
        """
        if all_branches and branch is not None:
            raise click.UsageError("--all pulls every branch: name none")
        with progress_bar("Pulling") as bar:
            if all_branches:
                results = c.dot(dot).pull_all(remote_name, stop_writers, same_owner, bar,
                                              remote_dot, stash)
            else:
                res = c.dot(dot).pull(remote_name, branch, stop_writers, same_owner, bar,
                                      remote_dot, stash)
        if not all_branches:
            _report(res, as_json, "fetched")
            return
        if as_json:
            emit_json([_transfer_json(r) for r in results])
        else:
            for r in results:
                _report(r, False, "fetched")
        refused = [r.branch for r in results if r.status == "refused"]
        if refused:
            raise Conflict(f"{len(refused)} branch(es) not moved: {', '.join(refused)} "
                           "(see above; --stash-on-divergence keeps yours aside and moves "
                           "them)")

    @cli.command()
    @click.argument("remote_name", metavar="REMOTE")
    @click.argument("remote_dot", metavar="NAMESPACE/DOT")
    @click.argument("branch", required=False)
    @click.option("--local-name", default=None, help="Default: the remote dot's name.")
    @click.option("--stash-on-divergence", "stash", is_flag=True,
                  help="Accepted for Dotmesh's scripts; a clone makes a new dot, so there is "
                       "nothing to diverge from.")
    @same_owner_flag
    @json_flag
    @pass_ctx
    def clone(c: Ctx, remote_name: str, remote_dot: str, branch: str | None,
              local_name: str | None, stash: bool, same_owner: bool, as_json: bool) -> None:
        """Copy a dot from a remote, with its tags and its folders ready to use. On a hub,
        a DOT without NAMESPACE/ is in your own namespace (as in Dotmesh).

        \b
        Example:  dm clone hub alice/app --local-name bug-42
                  dm clone hub app          # your own app on hub
        """
        del stash  # a new dot has nothing of its own to diverge
        with progress_bar("Cloning") as bar:
            res = c.repo.clone(remote_name, remote_dot, branch, local_name, bar,
                                     same_owner)
        _report(res, as_json, "fetched")


def _transfer_json(res: sync.Transfer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "remote": res.remote, "remote_dot": res.remote_dot, "branch": res.branch,
        "status": res.status, "old": res.old.hex() if res.old else None,
        "new": res.new.hex() if res.new else None, "objects": res.objects,
        "bytes": res.bytes, "tags": res.tags, "notes": res.notes, "stashed": res.stashed}
    if res.restored is not None:
        out["saved"] = res.restored.saved.hex() if res.restored.saved else None
    return out


def _report(res: sync.Transfer, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(_transfer_json(res))
        return
    where = f"{res.remote} {res.remote_dot} {res.branch}"
    for note in res.notes:
        click.echo(f"dm: note: {safe(note)}", err=True)
    if res.status == "refused":
        click.echo(f"{where}: not moved (see the note above)")
        return
    if res.stashed:
        whose = "The remote's diverging head" if verb == "sent" else "Your diverging head"
        there = f" on {res.remote}" if verb == "sent" else ""
        click.echo(f"{whose} {res.old.hex()[:12] if res.old else ''} is kept{there} on "
                   f"branch {res.stashed}")
    tags = f"; tags {'sent' if verb == 'sent' else 'taken'}: {safe(', '.join(res.tags))}" \
        if res.tags else ""
    if res.status == "up to date":
        click.echo(f"{where}: up to date{tags}")
        return
    if res.status == "ahead":
        click.echo(f"{where}: your branch has commits the remote lacks; nothing to pull "
                   f"(dm push sends them){tags}")
        return
    old = res.old.hex()[:12] if res.old else "(none)"
    new = res.new.hex()[:12] if res.new else "(none)"
    click.echo(f"{where}: {res.status} {old} -> {new}, {verb} {res.objects} objects "
               f"({human_size(res.bytes)}){tags}")
    if res.restored is not None and res.restored.saved:
        click.echo(f"The working state it replaced is saved as {res.restored.saved.hex()[:12]}")
