#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: creates .venv, installs setpoint with its test
# extras, installs the system packages tests need (redis-server, PostgreSQL, Chromium) with apt
# where missing, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
need=()
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/bin/chromium ] || need+=(chromium)  # dashboard browser tests (Playwright drives the system Chromium)
# PostgreSQL server binaries for the request-log tests (pytest-postgresql starts a throwaway server;
# Debian keeps pg_ctl/initdb in /usr/lib/postgresql/<version>/bin, off PATH: the tests look there too)
if ! command -v pg_ctl >/dev/null && ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
