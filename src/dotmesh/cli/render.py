"""Human and JSON output, and progress bars that show only on a terminal."""

from __future__ import annotations

import json
import sys
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


class Meter:
    """A progress callback: ``meter(n)`` adds n bytes done, ``meter.total(n)`` sets the total
    once it is known. Silent unless stderr is a terminal."""

    def __init__(self, advance: Callable[[int], None] = lambda n: None,
                 set_total: Callable[[int], None] = lambda n: None) -> None:
        self._advance, self.total = advance, set_total

    def __call__(self, n: int) -> None:
        self._advance(n)


@contextmanager
def progress_bar(label: str, total: int | None = None) -> Iterator[Meter]:
    """A rich bar with bytes and rate on a terminal; a no-op when piped."""
    if not sys.stderr.isatty():
        yield Meter()
        return
    from rich.console import Console  # imported here: it costs 80 ms of start-up
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as p:
        task = p.add_task(label, total=total)
        yield Meter(lambda n: p.advance(task, n), lambda n: p.update(task, total=n))


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


def commit_header(oid: bytes, cm: Any, parents: bool = False) -> None:
    """A commit as ``dm log`` and ``dm show`` print it: id, author, date, freeze, metadata
    and message (``parents``: each parent's id too)."""
    click.echo(f"commit {oid.hex()}")
    for p in cm.parents if parents else ():
        click.echo(f"Parent: {p.hex()}")
    click.echo(f"Author: {safe(cm.author)}")
    click.echo(f"Date:   {when(cm.timestamp_ns)}")
    if "dm.freeze_ms" in cm.metadata:
        click.echo(safe(f"Freeze: {cm.metadata['dm.freeze_ms']} ms "
                        f"({cm.metadata.get('dm.writers', '')})"))
    for k, v in sorted(cm.metadata.items()):
        if not k.startswith("dm."):
            click.echo(f"        {safe(k)}={safe(v)}")
    click.echo(f"\n{indented(cm.message)}\n")
