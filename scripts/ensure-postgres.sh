#!/usr/bin/env bash
# Start the machine's PostgreSQL for the store tests when it is installed but not running.
# No-op where it runs already or is not installed (those tests then skip, saying why).
set -u
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then exit 0; fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | head -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 1 20); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 0.5; done
fi
echo "ensure-postgres: PostgreSQL not available; PostgreSQL store tests will skip" >&2
exit 0
