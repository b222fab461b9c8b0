#!/usr/bin/env bash
# Screenshots of the web UI into docs/screenshots/ (shown in the README): a hub with sample
# data in a temporary folder, headless Chromium (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/screenshots.py "$@"
