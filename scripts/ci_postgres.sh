#!/usr/bin/env bash
# Start a throw-away PostgreSQL cluster on loopback for the server tests and print the export line:
#     eval "$(scripts/ci_postgres.sh)"      # sets ZOEDGE_TEST_PG_URL
#     scripts/ci_postgres.sh stop
# Installs the Debian `postgresql` package when no server binaries are found (needs root or sudo).
# Settings: ZOEDGE_PG_DIR (default /tmp/zoedge-pg), ZOEDGE_PG_PORT (default 55432). Logs go to stderr.
set -euo pipefail
DIR=${ZOEDGE_PG_DIR:-/tmp/zoedge-pg}
PORT=${ZOEDGE_PG_PORT:-55432}
DB=zoedge_test
USER_NAME=zoedge
log() { echo "ci_postgres: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

if [ -z "$(bindir)" ]; then
    log "installing postgresql (apt)"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
BIN=$(bindir)
[ -n "$BIN" ] || { log "no PostgreSQL server binaries after install"; exit 1; }

# initdb and postgres refuse to run as root: use the `postgres` system user then.
if [ "$(id -u)" = 0 ]; then
    OWNER=postgres
    run() { runuser -u postgres -- "$@"; }
else
    OWNER=$(id -un)
    run() { "$@"; }
fi

if [ "${1:-start}" = stop ]; then
    run "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
    exit 0
fi

mkdir -p "$DIR"
chown "$OWNER" "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
    log "initdb in $DIR/data"
    run "$BIN/initdb" -D "$DIR/data" -U "$USER_NAME" -A trust --no-sync -E UTF8 >&2
fi
if ! run "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    log "starting on 127.0.0.1:$PORT"
    run "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" start >&2
fi
if ! run "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    run "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" "$DB" >&2
fi
URL="postgresql://$USER_NAME@127.0.0.1:$PORT/$DB"
log "ready: $URL"
echo "export ZOEDGE_TEST_PG_URL=$URL"
