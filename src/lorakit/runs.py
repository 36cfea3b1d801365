"""The run folder (`lorakit train -o DIR`): the names of the files a training run writes, in one place. The loop
writes them, the CLI, the sweep and the dashboard read them.

    DIR/metrics.jsonl       one JSON line per optimizer step (loss, lr, tokens/s, ...) and per held-out eval
    DIR/train_config.json   what the run was asked to do (LoRA and training settings, backend, processes)
    DIR/train_done.json     written last: the run finished (steps, final loss, evals, parameter counts)
    DIR/eval.json           before/after evaluation (`--compare`)
    DIR/checkpoint/         the last whole checkpoint while the run is unfinished
    DIR/adapter_config.json + adapter_model.safetensors   the adapter (PEFT layout; adapters/refs.py names them)
"""
METRICS = "metrics.jsonl"
CONFIG = "train_config.json"
DONE = "train_done.json"
EVAL = "eval.json"
CHECKPOINT = "checkpoint"
