#!/usr/bin/env bash
# Before a GPU round (bench/gpu_round.sh): the tokenizer folder the real-data benches read, from the embedded
# model's cache (./demo.sh or any test makes it), into .cache/tok (git-ignored; carried with .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${LORAKIT_CACHE:-$HOME/.cache/lorakit}/SmolLM2-135M-Instruct
mkdir -p .cache/tok
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$src/$f" ] && cp "$src/$f" .cache/tok/
done
ls .cache/tok
