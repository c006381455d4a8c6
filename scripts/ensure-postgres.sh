#!/usr/bin/env bash
# Start the machine's PostgreSQL for the store tests when it is installed but not running.
# Where it runs already: nothing to do. Where it cannot be started: under CI=true this fails
# (exit 1: CI must run the PostgreSQL tests, not skip them); elsewhere it says so and exits 0
# (those tests then skip, saying why). PGHOST / PGPORT choose the server (127.0.0.1:5432).
set -u
host=${PGHOST:-127.0.0.1}
port=${PGPORT:-5432}

ready() { pg_isready -q -h "$host" -p "$port" 2>/dev/null; }

if ready; then exit 0; fi
why="pg_isready / pg_ctlcluster not installed"
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | head -1)
  why="pg_ctlcluster could not start cluster '${version:-?}/main'"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 1 20); do ready && exit 0; sleep 0.5; done
fi
if [ "${CI:-}" = "true" ]; then
  echo "ensure-postgres: CI=true and PostgreSQL is not reachable at $host:$port ($why);" \
    "the PostgreSQL store tests must run in CI: install and start PostgreSQL" >&2
  exit 1
fi
echo "ensure-postgres: PostgreSQL not available at $host:$port ($why);" \
  "PostgreSQL store tests will skip" >&2
exit 0
