#!/usr/bin/env bash
# Set up (see setup.sh), then run the seed's app in miniature on dotmesh: clicks in Redis, users
# in PostgreSQL and an uploads folder, as three subdots of dot "app". The app keeps writing
# while we commit it live; then we break it and bring it back with one reset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK=$(mktemp -d /tmp/dm-demo.XXXXXX)
chmod 755 "$WORK"
export DM_HOME="$WORK/home"
RUN="$WORK/run"  # PostgreSQL's socket folder: the postgres user must be able to write it
mkdir "$RUN"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
PGPORT=54400
APP_PID=""

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n\033[36m# %s\033[0m\n' "$*"; }
as_pg() { runuser -u postgres -- "$@"; }
# setpriv execs the server in place: a supervisor such as runuser would sit between us and it.
as_pg_exec() { setpriv --reuid postgres --regid postgres --clear-groups -- "$@"; }
psql_() { as_pg "$PGBIN/psql" -h "$RUN" -p "$PGPORT" -U postgres -d postgres -tAc "$1"; }
redis_() { redis-cli -s "$WORK/redis.sock" "$@"; }
# The servers run as jobs of this shell (not daemonized), so it reaps them when they stop.
start_servers() {
  as_pg_exec "$PGBIN/postgres" -D "$USERS" -k "$RUN" -c listen_addresses= -p "$PGPORT" \
    >>"$WORK/pg.log" 2>&1 &
  redis-server --port 0 --unixsocket "$WORK/redis.sock" --dir "$CLICKS" --appendonly yes \
    --appendfsync always --save '' --logfile "$WORK/redis.log" &
  for _ in $(seq 500); do
    redis_ PING >/dev/null 2>&1 && "$PGBIN/pg_isready" -q -h "$RUN" -p "$PGPORT" && return
    sleep 0.02
  done
  echo "servers did not start; see $WORK/pg.log and $WORK/redis.log" >&2; exit 1
}
stop_servers() {
  [ -n "$APP_PID" ] && kill "$APP_PID" 2>/dev/null || true
  redis_ SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  pkill -INT -f "postgres -D $USERS" 2>/dev/null || true
  wait 2>/dev/null || true
}
status() {
  echo "redis counter = $(redis_ GET counter 2>/dev/null || echo '(down)'),"\
       "postgres max(n) = $(psql_ 'SELECT max(n) FROM steps' 2>/dev/null || echo '(no table)'),"\
       "uploads = $(find "$UPLOADS" -name '*.bin' | wc -l) files"
}
trap stop_servers EXIT

echo "Demo store: $DM_HOME"
step dm init app
CLICKS=$(dm path app.clicks-db); USERS=$(dm path app.users-db); UPLOADS=$(dm path app.uploads)
chown postgres:postgres "$USERS" "$RUN"; chmod 700 "$USERS"
as_pg "$PGBIN/initdb" -D "$USERS" -A trust -U postgres >/dev/null
start_servers
psql_ "CREATE TABLE steps (n int PRIMARY KEY, payload text)" >/dev/null
say "The app writes PostgreSQL, then Redis, then an upload, in a loop."
.venv/bin/python demo/miniapp.py "$RUN" "$PGPORT" "$WORK/redis.sock" "$UPLOADS" &
APP_PID=$!
sleep 2
say "dm finds the running writers itself (open files and working folders):"
step dm dot show
say "Commit while it runs: a copy first, then a short freeze of all writers at once."
step dm commit -m "the app, live"
sleep 1
step dm commit -m "a little later"
step dm log -n 2
status

say "Now break it: drop the table, flush Redis, delete the uploads."
psql_ "DROP TABLE steps" >/dev/null
redis_ FLUSHALL >/dev/null
find "$UPLOADS" -name '*.bin' -delete
sleep 0.3
status
step dm diff --stat
say "One reset brings all three stores back to the last commit (the broken state is kept)."
step dm reset --hard HEAD --stop-writers
APP_PID=""
start_servers
status
say "Consistent across stores: counter <= max(n) <= counter + 1, and every upload up to it."
step dm reflog -n 3
step dm fsck
echo; echo "Done. Explore it with: DM_HOME=$DM_HOME $PWD/.venv/bin/dm log"
echo "(or put dm on your PATH: export PATH=\"$PWD/.venv/bin:\$PATH\" DM_HOME=$DM_HOME)"
