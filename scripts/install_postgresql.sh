#!/usr/bin/env bash
# Debian's PostgreSQL server for the registry tests (tests/pg_cluster.py starts a throwaway cluster with its
# initdb and pg_ctl on a temporary directory and a Unix socket; as root it runs the server as the `postgres` user
# the package creates). Uses apt-get as root (CI runs as root) or through sudo without a password; does nothing
# when initdb is already there. The package's own cluster service is not needed and is left as the package sets it.
set -euo pipefail
for c in initdb /usr/lib/postgresql/*/bin/initdb; do
  if command -v "$c" >/dev/null 2>&1; then echo "postgresql: $(command -v "$c")"; exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install PostgreSQL to run the registry's PostgreSQL tests (they are skipped without it)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql
ls /usr/lib/postgresql/*/bin/initdb
