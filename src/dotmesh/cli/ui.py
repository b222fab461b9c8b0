"""``dm ui``: the web UI over the local store (``server/web/local.py``), on 127.0.0.1."""

from __future__ import annotations

import click

from dotmesh.cli.context import Ctx, pass_ctx
from dotmesh.heap import long_running

DEFAULT_PORT = 8780


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
                  show_default=True, help="Port on 127.0.0.1 to serve the pages on.")
    @click.option("--open", "open_browser", is_flag=True,
                  help="Open the pages in your web browser too.")
    @pass_ctx
    def ui(c: Ctx, port: int, open_browser: bool) -> None:
        """Browse and work on your dots in a web browser: their branches, tags and history,
        a commit's files and data changes; check out, reset, tag and commit from a page.
        Serves on 127.0.0.1 only, in the foreground, until stopped; the pages need the
        link it prints (it carries a random token).

        \b
        Example:  dm ui --port 8780 --open
        """
        import secrets  # noqa: PLC0415

        import uvicorn  # noqa: PLC0415

        from dotmesh.server.web.local import create_app  # noqa: PLC0415

        c.repo  # noqa: B018 - a mistyped --home or DM_HOME is refused here, not served empty
        c.close()  # each request opens the store for itself
        token = secrets.token_urlsafe(24)
        app = create_app(c.path, token, port=port)
        url = f"http://127.0.0.1:{port}/open?token={token}"
        click.echo(f"dm ui: serving the dots of {c.path} on 127.0.0.1:{port}; "
                   "open this link (Ctrl-C stops):", err=True)
        click.echo(url)
        if open_browser:
            import webbrowser  # noqa: PLC0415

            webbrowser.open(url)
        long_running()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
