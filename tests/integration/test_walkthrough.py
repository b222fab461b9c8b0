"""The README's walkthrough ("Using it"), typed at a terminal from a fresh store: a shell in a
pseudo-terminal (pexpect), so what is checked is what a user sees: progress bars on the
terminal, tables, one-line errors, the words of each answer."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

PROMPT = "DM-WALK$ "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    def __init__(self, home: Path, cwd: Path) -> None:
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "DM_HOME": str(home), "DM_AUTHOR": "walker", "PS1": PROMPT,
               "PATH": f"{bindir}:{os.environ['PATH']}", "TERM": "xterm", "COLUMNS": "120"}
        self.shell = pexpect.spawn("bash", ["--norc", "--noprofile"], env=env, cwd=str(cwd),
                                   encoding="utf-8", timeout=120, dimensions=(40, 120))
        self.shell.expect_exact(PROMPT)

    def type(self, line: str) -> str:
        """Type ``line`` and return what the terminal showed until the next prompt, without
        colours, cursor moves and carriage returns."""
        self.shell.sendline(line)
        self.shell.expect_exact(PROMPT)
        shown = ANSI.sub("", self.shell.before or "")
        return shown.split("\n", 1)[1] if "\n" in shown else ""  # drop the echoed line

    def raw(self, line: str) -> str:
        self.shell.sendline(line)
        self.shell.expect_exact(PROMPT)
        return self.shell.before or ""

    def close(self) -> None:
        self.shell.sendline("exit")
        self.shell.close(force=True)


@pytest.mark.slow  # some forty dm commands at a terminal
def test_the_readme_walkthrough_at_a_terminal(tmp_path):
    t = Terminal(tmp_path / "home", tmp_path)
    try:
        assert "Created dot app" in t.type("dm init app")
        assert "no dot named 'apq' (did you mean 'app'?" in t.type("dm path apq.clicks-db")
        out = t.type('redis-server --dir "$(dm path app.clicks-db)" --port 0 --unixsocket '
                     f'{tmp_path}/redis.sock --daemonize yes --save ""')
        assert "dm: error" not in out
        t.type(f"redis-cli -s {tmp_path}/redis.sock SET clicks 10 >/dev/null")
        t.type(f"redis-cli -s {tmp_path}/redis.sock SAVE >/dev/null")
        users = t.type("dm path app.users-db").strip()
        assert users.endswith("/dots/app/subdots/users-db")
        t.type(f"printf 'ann\\nbob\\n' > {users}/users")
        shown = t.raw('dm commit -m "two users, ten clicks" -d ticket=BUG-42')
        assert "Committing" in shown  # a progress bar on a terminal
        out = ANSI.sub("", shown)
        assert re.search(r"\[master [0-9a-f]{12}\] two users, ten clicks", out), out
        assert "froze redis-server" in out  # the running Redis was stopped for a moment
        t.type(f"printf 'ann\\nbob\\ncy\\n' > {users}/users")
        assert "M users-db:users" in t.type("dm diff") or "users-db" in t.type("dm diff")
        status = t.type("dm status")
        assert "app" in status and "master" in status
        assert "three users" in t.type('dm commit -m "three users"')
        log = t.type("dm log -n 5 --oneline")
        assert log.index("three users") < log.index("two users, ten clicks")
        out = t.type("dm checkout -b experiment")  # Redis runs on the dot: refused, one line
        assert "in use by redis-server" in out and "--stop-writers" in out
        out = t.type("dm checkout -b experiment --stop-writers")
        assert "Stopped redis-server" in out and "Switched to a new branch experiment" in out
        assert "Switched to branch master" in t.type("dm checkout master")
        t.type(f"echo broken > {users}/users")
        out = t.type("dm reset --hard HEAD^")
        assert "HEAD is now at" in out and "two users, ten clicks" in out
        assert "discarded working state is saved as" in out
        assert t.type(f"cat {users}/users") .split() == ["ann", "bob"]
        assert "Tagged" in t.type('dm tag bug-42 -m "the user who cannot log in"')
        assert "bug-42" in t.type("dm tag")
        show = t.type("dm show bug-42")
        assert "ticket: BUG-42" in show or "ticket=BUG-42" in show or "BUG-42" in show
        assert "users" in t.type("dm ls bug-42:users-db")
        assert t.type("dm cat bug-42:users-db/users").split() == ["ann", "bob"]
        assert "Exported bug-42" in t.type(f"dm export bug-42 {tmp_path}/bug-42")
        assert (tmp_path / "bug-42" / "users-db" / "users").read_text() == "ann\nbob\n"
        assert "Switched to a new branch fix-42" in t.type("dm checkout -b fix-42 bug-42")
        listed = t.type("dm list")
        assert re.search(r"\*\s+app\s+fix-42", listed), listed
        assert "COMMITS" in listed and "UNCOMMITTED" in listed
        assert "Dot app (current)" in t.type("dm dot show")
        branches = t.type("dm branch")
        assert "* fix-42" in branches and "experiment" in branches
        fsck = t.type("dm fsck")
        assert "dm: error" not in fsck
        err = t.type("dm checkout nope").strip().splitlines()  # (bars are erased: transient)
        assert err[-1].startswith("dm: error: dot 'app' has no branch 'nope'"), err
        assert all("error" not in line for line in err[:-1])
    finally:
        t.close()
