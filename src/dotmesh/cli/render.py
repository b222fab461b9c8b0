"""Human and JSON output, and progress bars that show only on a terminal."""

from __future__ import annotations

import json
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click

# Controls (C0, C1, tab included), format characters (bidi overrides and marks, zero-width
# ones), line and paragraph separators, and undecodable bytes (kept as lone surrogates).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escaped(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as surrogateescape keeps it
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def safe(text: str) -> str:
    """``text`` from elsewhere (a pusher's message or author, a file name, a hub's error) made
    harmless on a terminal: escape sequences, carriage returns, bidi overrides, invisible
    characters and undecodable bytes are shown as escapes, so they can neither drive the
    terminal nor disguise a line."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escaped(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c
                   for c in text)


def first_line(text: str) -> str:
    """A message's first line, for one-line contexts (the rest is in ``dm log``)."""
    return safe(text.split("\n", 1)[0])


def indented(text: str, indent: str = "    ") -> str:
    """A multi-line message, every line indented as git log shows them."""
    return "\n".join(indent + safe(line) for line in text.split("\n"))


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def when(ts_ns: int | None) -> str:
    if ts_ns is None:
        return "-"
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> None:
    cells = [[safe(str(c)) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


class Output:
    """How much a command says besides its result, set by the global options: ``quiet``
    (no progress, fewer informational lines) and ``progress`` ("auto": a bar on a
    terminal, nothing otherwise; "json": one JSON line per update on stderr; "none")."""

    quiet = False
    progress = "auto"

    @classmethod
    def reset(cls) -> None:
        cls.quiet, cls.progress = False, "auto"


def info(message: str, err: bool = False) -> None:
    """An informational line (a note, a detail after the result): --quiet drops it."""
    if not Output.quiet:
        click.echo(message, err=err)


class Meter:
    """A progress callback: ``meter(n)`` adds n units done, ``meter.total(n)`` sets the total
    once it is known, ``meter.expect(n)`` adds n to it (each subdot's part, as found)."""

    def __init__(self, advance: Callable[[int], None] = lambda n: None,
                 set_total: Callable[[int], None] = lambda n: None,
                 add_total: Callable[[int], None] = lambda n: None) -> None:
        self._advance, self.total, self.expect = advance, set_total, add_total

    def __call__(self, n: int) -> None:
        self._advance(n)


class JsonProgress:
    """One JSON object a line on ``stream`` (stderr): label, done, total (null while
    unknown), rate (units a second), eta (seconds, null while unknown), unit, and final (the
    last line of this operation). At most one line every ``interval`` seconds between the
    first (done 0) and the final one."""

    def __init__(self, label: str, total: int | None, unit: str, stream: Any,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.5) -> None:
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.clock, self.interval = clock, interval
        self.done = 0
        self.started = self.last = clock()
        self.line()

    def advance(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last >= self.interval:
            self.line()

    def set_total(self, n: int) -> None:
        self.total = n

    def add_total(self, n: int) -> None:
        self.total = (self.total or 0) + n

    def line(self, final: bool = False) -> None:
        now = self.last = self.clock()
        if final and self.total is None:
            self.total = self.done  # never announced: what was done was all there was
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (0.0 if final else max(0.0, (self.total - self.done) / rate)
               if self.total is not None and rate > 0 else None)
        self.stream.write(json.dumps({
            "label": self.label, "done": self.done, "total": self.total,
            "rate": round(rate, 1), "eta": None if eta is None else round(eta, 1),
            "unit": self.unit, "final": final}) + "\n")
        self.stream.flush()


@contextmanager
def progress_bar(label: str, total: int | None = None, unit: str = "bytes") -> Iterator[Meter]:
    """Progress of a long operation on stderr, as the global options say: a rich bar (done,
    total, rate, time left) on a terminal, JSON lines under --progress=json, else nothing."""
    if Output.progress == "json" and not Output.quiet:
        p = JsonProgress(label, total, unit, sys.stderr)
        yield Meter(p.advance, p.set_total, p.add_total)
        p.line(final=True)
        return
    if Output.quiet or Output.progress == "none" or not sys.stderr.isatty():
        yield Meter()
        return
    from rich.console import Console  # imported here: it costs 80 ms of start-up
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amounts = ((DownloadColumn(), TransferSpeedColumn()) if unit == "bytes"
               else (MofNCompleteColumn(), TextColumn(unit)))
    with Progress(TextColumn("{task.description}"), BarColumn(), *amounts,
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def add_total(n: int) -> None:
            bar.update(task, total=(bar.tasks[0].total or 0) + n)

        yield Meter(lambda n: bar.advance(task, n), lambda n: bar.update(task, total=n),
                    add_total)


def data_report(reports: list[Any]) -> None:
    """``dm diff --data`` for people: per subdot, what changed in its store's terms."""
    marks = {"added": "+", "removed": "-", "changed": "M"}
    for r in reports:
        click.echo(f"{safe(r.subdot)} ({r.kind})")
        if r.note:
            click.echo(f"  {safe(r.note)}")
        quiet = True
        for what, keys in r.keys.items():
            for k in keys:
                quiet = False
                shown = (f"{safe(k['old'])} -> {safe(k['new'])}" if what == "changed"
                         else safe(k["value"]))
                click.echo(f"  {marks[what]} key {safe(k['key'])} ({k['type']}): {shown}")
        for db in r.databases:
            quiet = False
            click.echo(f"  {safe(db['path'])}:")
            for s in db["schema"]:
                verb = "added" if s["old"] is None else "dropped" if s["new"] is None else "changed"
                click.echo(f"    schema: {safe(s['name'])} {verb}")
            for table, t in db["tables"].items():
                click.echo(f"    table {safe(table)}: {t['added']} added, {t['removed']} "
                           f"removed, {t['changed']} changed")
                for what in ("added", "removed"):
                    for row in t["first"][what]:
                        click.echo(f"      {marks[what]} {safe(str(row))}")
                for ch in t["first"]["changed"]:
                    click.echo(f"      M {safe(str(ch['old']))} -> {safe(str(ch['new']))}")
        if r.kind in ("files", "postgres"):
            for f in r.files:
                quiet = False
                click.echo(f"  {marks[f['status']]} {safe(f['path'])}")
        for text in r.text.values():
            quiet = False
            for line in text.splitlines():
                click.echo(f"    {safe(line)}")
        if quiet:
            click.echo("  no changes")


_WRITER = re.compile(r"(.+?) \(pid (\d+)\)(?:, |$)")


def grouped_writers(text: str) -> str:
    """A commit's ``dm.writers`` (``postgres (pid 41), postgres (pid 42), container web``,
    every pid kept in the commit) as people read it: ``postgres (2 processes), container
    web``; a process alone keeps its pid. Parts in another form are shown as they are."""
    groups: dict[str, list[str]] = {}
    for part in text.split(", ") if text else []:
        m = _WRITER.fullmatch(part)
        groups.setdefault(m[1] if m else part, []).append(m[2] if m else "")
    return ", ".join(safe(name) if not pids[0] else f"{safe(name)} (pid {pids[0]})"
                     if len(pids) == 1 else f"{safe(name)} ({len(pids)} processes)"
                     for name, pids in groups.items())


def commit_header(oid: bytes, cm: Any, parents: bool = False) -> None:
    """A commit as ``dm log`` and ``dm show`` print it: id, author, date, freeze, metadata
    and message (``parents``: each parent's id too)."""
    click.echo(f"commit {oid.hex()}")
    for p in cm.parents if parents else ():
        click.echo(f"Parent: {p.hex()}")
    click.echo(f"Author: {safe(cm.author)}")
    click.echo(f"Date:   {when(cm.timestamp_ns)}")
    if "dm.freeze_ms" in cm.metadata:
        click.echo(f"Freeze: {safe(cm.metadata['dm.freeze_ms'])} ms "
                   f"({grouped_writers(cm.metadata.get('dm.writers', ''))})")
    for k, v in sorted(cm.metadata.items()):
        if not k.startswith("dm."):
            click.echo(f"        {safe(k)}={safe(v)}")
    click.echo(f"\n{indented(cm.message)}\n")
