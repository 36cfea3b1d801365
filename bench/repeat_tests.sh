#!/usr/bin/env bash
# Run the given pytest node ids N times in a row, each run a fresh pytest process (a fresh PostgreSQL cluster),
# and print one line per run and a summary; exits non-zero on the first failure (a run over $RUN_TIMEOUT s, 900 by
# default, fails).
#   N=10 bench/repeat_tests.sh tests/integration/test_registry_pg_race.py tests/integration/test_registry_pg_kill.py
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-10}
PY=${PYTHON:-.venv/bin/python}
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD) on $(nproc) cores: $N runs of $*"
for i in $(seq 1 "$N"); do
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  out=$(HF_HUB_OFFLINE=1 PYTHONPATH=src timeout "${RUN_TIMEOUT:-900}" nice "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1)
  rc=$?
  took=$(echo "$(date +%s.%N) - $start" | bc)
  echo "run $i: rc=$rc $(echo "$out" | tail -1) (wall ${took%.*} s, loadavg 1m before $load)"
  [ $rc -eq 0 ] || { echo "$out" | tail -40; exit 1; }
done
echo "$N of $N runs passed in a row"
