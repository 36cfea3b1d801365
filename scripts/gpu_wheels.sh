#!/usr/bin/env bash
# Before a GPU round: the wheels the engine round's http case needs on the device (Python 3.12, no network; it
# has torch, transformers, peft, httpx, but not the server's or the openai client's packages), downloaded into
# .whl (git-ignored, carried; bench/gpu_round.sh installs .whl/*.whl into /tmp/site), each at the version this
# machine's .venv has. Pure-Python wheels are any-platform; pydantic-core and jiter are built for cp312 manylinux.
# Also the training rounds' peers and 4-bit libraries, at the versions the results name: bitsandbytes 0.50.2,
# liger-kernel 0.8.5, torchao 0.18.0 (all of it stays under the device's 64 MiB carry: about 52 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP=/work/main/.venv/bin/pip
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
get() {  # get PLATFORM_FLAGS NAME...
  local flags=$1; shift
  for name in "$@"; do
    v=$(version "$name"); [ -n "$v" ] || { echo "$name is not in the venv" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $flags \
      -d .whl "$name==$v"
  done
}
get "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64" \
  pydantic-core jiter
get "--platform any" fastapi starlette uvicorn pydantic annotated-types typing-inspection annotated-doc \
  opentelemetry-api openai httpx2 httpcore2 truststore sniffio click typing-extensions anyio idna h11
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl bitsandbytes==0.50.2 liger-kernel==0.8.5 torchao==0.18.0
du -sh .whl
