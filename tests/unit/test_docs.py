"""docs/python.md quotes the files of docs/examples/ (which CI runs and type-checks): each
quote is the file as it is, and every file is quoted."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUOTE = re.compile(r"^<!-- quoted from (\S+): [^\n]*-->\n```python\n(.*?)^```$",
                   re.MULTILINE | re.DOTALL)


def quotes(page: str) -> dict[str, str]:
    return {path: body for path, body in QUOTE.findall(page)}


def test_the_python_page_quotes_every_example_file_as_it_is() -> None:
    found = quotes((ROOT / "docs" / "python.md").read_text())
    examples = {f"docs/examples/{p.name}" for p in (ROOT / "docs" / "examples").glob("*.py")}
    assert set(found) == examples, "quote each file of docs/examples/ once, and only those"
    stale = [path for path, body in found.items() if (ROOT / path).read_text() != body]
    assert stale == [], f"docs/python.md quotes an old version of {stale}: paste them again"


def test_a_changed_file_is_caught() -> None:
    page = ("<!-- quoted from docs/examples/capture_bug.py: kept equal -->\n```python\n"
            "print('old')\n```\n")
    assert quotes(page) == {"docs/examples/capture_bug.py": "print('old')\n"}
    assert quotes(page)["docs/examples/capture_bug.py"] != (
        ROOT / "docs/examples/capture_bug.py").read_text()
