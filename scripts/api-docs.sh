#!/usr/bin/env bash
# The API reference, built from the docstrings by pdoc, in docs/api/ (not committed; open
# docs/api/index.html). Fails, naming each one, on a docstring reference that names nothing;
# CI runs the same check (tests/unit/test_api_docs.py). Options: --out DIR, --check-only.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/api_docs.py "$@"
