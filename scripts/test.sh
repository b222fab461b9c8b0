#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite: lint, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
# Two workers (pytest-xdist), a test file on one worker: its module-scoped servers start once.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=30 "$@"
