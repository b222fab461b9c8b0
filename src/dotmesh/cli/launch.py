"""The ``dm`` entry point: the resident daemon runs the command if one is up, else this process.

Kept to the standard library: it runs before anything else, on every command.
"""

from __future__ import annotations

import sys

# Commands that manage the daemon, or run for a long time as servers, always run here.
_HERE = frozenset({"daemon", "serve"})


def main() -> None:
    argv = sys.argv[1:]
    if not _HERE.intersection(argv[:argv.index("--")] if "--" in argv else argv):
        from dotmesh.server.resident import ask

        code = ask(argv)
        if code is not None:
            sys.exit(code)
    from dotmesh.cli.main import main as run_here

    run_here()
