#!/usr/bin/env bash
# Stops the server scripts/start_postgres.sh started (its data folder is in
# LOSSGEO_TEST_POSTGRES_DATA) and removes its data.
set -u
[ -n "${LOSSGEO_TEST_POSTGRES_DATA:-}" ] || exit 0
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
if [ "$(id -u)" = 0 ]; then
  runuser -u postgres -- "$bin/pg_ctl" -D "$LOSSGEO_TEST_POSTGRES_DATA" stop -m fast >/dev/null 2>&1
else
  "$bin/pg_ctl" -D "$LOSSGEO_TEST_POSTGRES_DATA" stop -m fast >/dev/null 2>&1
fi
rm -rf "$LOSSGEO_TEST_POSTGRES_DATA"
