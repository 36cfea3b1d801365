"""Which defaults serve a user best: `lorakit train` + `lorakit eval` with candidate default settings on more than
one task, held-out exact match with its 95% interval (Wilson), one JSON line per (task, config).

Tasks: data/demo (dates to ISO 8601, 1,000 rows, 100 held out) and data/classify (10-class routing of customer
messages, 1,200 chat rows, 200 held out), one epoch each, batch 8, the embedded SmolLM2-135M, CPU fp32.
Configs: lorakit's defaults (r=16, alpha=32, every linear layer, lr 2e-4), PEFT's (`--preset peft`: r=8, alpha=8,
q_proj+v_proj, the same lr), the README's earlier example (r=16, alpha=32, q_proj+v_proj), and lorakit's at
learning rates 3e-4 and 5e-4.

    python bench/defaults.py [--tasks demo,classify] [--configs lorakit,peft,qv16] [--limit N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from train_speed import machine  # noqa: E402
from train_task import ENV, _rows  # noqa: E402

from lorakit.train.evaluate import wilson  # noqa: E402

CONFIGS = {  # name: extra `lorakit train` flags on top of the command's own defaults
    "lorakit": [],
    "peft": ["--preset", "peft"],
    "qv16": ["--targets", "q_proj,v_proj"],
    "lr3e-4": ["--lr", "3e-4"],
    "lr5e-4": ["--lr", "5e-4"],
}
TASKS = {"demo": ROOT / "data" / "demo", "classify": ROOT / "data" / "classify"}


def _run(cmd: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "lorakit", *cmd], capture_output=True, text=True, env=ENV)
    if p.returncode:
        raise RuntimeError(f"lorakit {' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")


def run(task: str, config: str, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ad"
        t0 = time.time()
        _run(["train", "--model", "embedded", "--data", str(_rows(TASKS[task] / "train.jsonl", limit)), "--epochs",
              "1", "-o", str(out), "--quiet", *CONFIGS[config]])
        train_s = time.time() - t0
        cfg = json.loads((out / "train_config.json").read_text())
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        _run(["eval", "--model", "embedded", "--adapter", str(out), "--data", str(TASKS[task] / "test.jsonl"),
              "--max-new-tokens", "16", "--json", f"{d}/eval.json", "--quiet"]
             + (["--limit", str(min(limit, 50))] if limit else []))
        rep = json.loads(Path(d, "eval.json").read_text())
    n = rep["n"]
    acc, base = rep["after"]["accuracy"], rep["before"]["accuracy"]
    lo, hi = wilson(round(acc * n), n)
    lora = cfg.get("lora", {})
    return {"bench": "defaults", "task": task, "config": config, "flags": CONFIGS[config], "r": lora.get("r"),
            "alpha": lora.get("alpha"), "targets": lora.get("targets"), "lr": cfg.get("train", {}).get("lr"),
            "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1], "n_heldout": n,
            "accuracy": acc, "accuracy_ci95": [round(lo, 4), round(hi, 4)], "base_accuracy": base,
            "train_s": round(train_s, 1), "machine": machine(), "date": time.strftime("%Y-%m-%d")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="demo,classify")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--limit", type=int, default=0, help="first N training rows only (a dry run)")
    ap.add_argument("--out", help="append the JSON lines here too")
    args = ap.parse_args()
    for task in args.tasks.split(","):
        for config in args.configs.split(","):
            if task not in TASKS or config not in CONFIGS:
                ap.error(f"unknown task {task!r} or config {config!r} (tasks: {', '.join(TASKS)}; "
                         f"configs: {', '.join(CONFIGS)})")
            rec = run(task, config, args.limit)
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
