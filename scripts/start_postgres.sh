#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server on 127.0.0.1 for the distributed-sweep tests and
# prints its URL. Usage: eval "$(bash scripts/start_postgres.sh [PORT])"
# (Debian's `postgresql` package provides the binaries.)
set -euo pipefail
port="${1:-55432}"
# another server on that port (a developer's, say): take a free one instead
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
data="$(mktemp -d /tmp/lossgeo-pg.XXXXXX)"
run_as=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$data"
  run_as=(runuser -u postgres --)
fi
"${run_as[@]}" "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
"${run_as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=200" start >/dev/null
echo "export LOSSGEO_TEST_POSTGRES=postgresql://postgres@127.0.0.1:$port/postgres"
echo "export LOSSGEO_TEST_POSTGRES_DATA=$data"
