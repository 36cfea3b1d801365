#!/usr/bin/env bash
# Fresh machine -> set up .venv -> fine-tune the embedded SmolLM2-135M-Instruct on the demo task
# (dates -> ISO 8601) with LoRA on the CPU, then print accuracy before/after and example answers.
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS=${EXTRAS-} ./scripts/setup.sh  # the library alone: the demo needs no test/serve extras
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/lorakit train --model embedded --data data/demo/train.jsonl --eval-data data/demo/test.jsonl \
  --config data/demo/lora.yaml --compare --max-new-tokens 12 -o runs/demo "$@"
# exit 1 unless the adapter beat the base on the held-out rows (CI runs this script as the README states it)
.venv/bin/python scripts/check_demo.py runs/demo/eval.json
