"""What reaches a terminal from elsewhere is shown, never obeyed."""

from __future__ import annotations

import pytest

from dotmesh.cli.render import first_line, indented, safe


@pytest.mark.parametrize("text, shown", [
    ("plain words", "plain words"),
    ("café 日本 👍", "café 日本 👍"),  # letters of every script stay as they are
    ("\x1b[2Jgone", "\\x1b[2Jgone"),  # an escape sequence
    ("\x9b31m", "\\x9b31m"),  # the one-byte CSI of C1
    ("ok\rfake", "ok\\x0dfake"),  # a carriage return that would overwrite the line
    ("exe.\u202egnp", "exe.\\u202egnp"),  # a bidi override
    ("a\u2028b\u200bc", "a\\u2028b\\u200bc"),  # a line separator, a zero-width space
    ("bad \udcff byte", "bad \\xff byte"),  # a byte that was not UTF-8
])
def test_safe_escapes_what_could_drive_or_disguise(text, shown):
    assert safe(text) == shown


def test_messages_keep_their_lines_but_never_start_one_of_dm_s_own():
    assert first_line("subject\nbody") == "subject"
    assert indented("subject\ncommit 123\r") == "    subject\n    commit 123\\x0d"
