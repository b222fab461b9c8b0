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


def test_writers_are_grouped_by_name_and_the_commit_keeps_every_pid():
    from dotmesh.cli.render import grouped_writers

    stored = ", ".join([*(f"postgres (pid {p})" for p in range(40, 47)),
                        "redis-server (pid 7)", "container web"])
    assert grouped_writers(stored) == "postgres (7 processes), redis-server (pid 7), container web"
    assert grouped_writers("") == ""
    assert grouped_writers("\x1b[2J (pid 1)") == "\\x1b[2J (pid 1)"


def test_json_progress_lines_have_label_done_total_rate_and_eta():
    import io
    import json

    from dotmesh.cli.render import JsonProgress

    now = [0.0]
    out = io.StringIO()
    p = JsonProgress("Pushing", None, "bytes", out, clock=lambda: now[0], interval=0.5)
    p.add_total(1000)
    now[0] = 1.0
    p.advance(250)  # 250 B/s: 3 s left
    now[0] = 1.1
    p.advance(10)  # within the interval: no line
    p.line(final=True)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["done"] for x in lines] == [0, 250, 260]
    assert lines[1] == {"label": "Pushing", "done": 250, "total": 1000, "rate": 250.0,
                        "eta": 3.0, "unit": "bytes", "final": False}
    assert lines[0]["eta"] is None and lines[-1]["final"] is True
