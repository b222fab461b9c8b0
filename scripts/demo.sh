#!/usr/bin/env bash
# Set up (see setup.sh) and walk through the seed's journey on a throwaway store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export DM_HOME="${DM_HOME:-$(mktemp -d /tmp/dm-demo.XXXXXX)}"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "Demo store: $DM_HOME"
step dm init app
CLICKS=$(dm path app.clicks-db); USERS=$(dm path app.users-db); UPLOADS=$(dm path app.uploads)
echo '{"clicks": [[10, 20], [30, 40]]}' > "$CLICKS/clicks.json"
python3 -c "import os; open('$USERS/users.tbl','wb').write(os.urandom(8192*256))"
echo "alice" > "$USERS/names.txt"
cp /etc/debian_version "$UPLOADS/alice-logo.txt"
step dm list
step dm commit -m "alice signed up and clicked twice" -d ticket=DEMO-1

echo '{"clicks": [[10, 20], [30, 40], [50, 60]]}' > "$CLICKS/clicks.json"
echo "bob" >> "$USERS/names.txt"
cp /etc/hostname "$UPLOADS/bob-logo.txt"
step dm diff
step dm commit -m "bob joined"
step dm log
BOB=$(dm log -n 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][:12])')

step dm checkout -b experiment
echo "corrupted" > "$CLICKS/clicks.json"; rm "$USERS/names.txt"
step dm commit -m "an experiment that breaks things"
step dm diff HEAD^ HEAD --stat
step dm checkout master
step cat "$USERS/names.txt"

echo "oops" > "$CLICKS/clicks.json"
step dm reset --hard HEAD^
step cat "$CLICKS/clicks.json"
step dm reflog
step dm reset --hard "$BOB"
step cat "$CLICKS/clicks.json"
step dm branch
step dm list
step dm fsck
echo; echo "Done. Explore it with: DM_HOME=$DM_HOME dm log"
