"""Capture the running app's state while it shows bug 42 (a user whose email was stored
with capitals and spaces cannot log in) and name it ``bug-42``.

    DM_HOME=~/.dotmesh APP_SOCKETS=/tmp/mobycounter python capture_bug.py
"""

from __future__ import annotations

import sys

import dotmesh

import mobycounter


def main() -> int:
    with mobycounter.connect() as running:
        rows = running.users.execute(
            "SELECT email FROM users WHERE email <> lower(trim(email))").fetchall()
    if not rows:
        print("no user shows bug 42 yet", file=sys.stderr)
        return 1
    with dotmesh.Repo.open() as repo:  # $DM_HOME, else ~/.dotmesh
        app = repo.dot("app")
        stored = 0

        def progress(done: int) -> None:  # bytes since the last call
            nonlocal stored
            stored += done

        # The servers keep running: they are stopped for a moment at the end, so that
        # PostgreSQL and Redis are captured at one point in time.
        result = app.commit("bug 42: a user who cannot log in",
                            metadata={"ticket": "BUG-42", "emails": repr(rows)},
                            progress=progress)
        try:
            app.tag("bug-42", result.id.hex(), message="the user who cannot log in")
        except dotmesh.AlreadyExists:
            print("bug-42 is taken: keeping it; this state is", result.id.hex()[:12],
                  file=sys.stderr)
            return 1
    print(f"bug-42 is {result.id.hex()[:12]}: {len(rows)} user(s), {stored} bytes read, "
          f"writers frozen for {result.commit.metadata.get('dm.freeze_ms', '?')} ms")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except dotmesh.DotmeshError as e:  # one line, and dm's exit code for it
        print(f"capture_bug: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
