"""What a QLoRA adapter is worth on each base it can meet (issue 24), on the CPU: one short QLoRA training on the
demo task (data/demo: dates to ISO 8601, the embedded SmolLM2-135M-Instruct, data/demo/lora.yaml's settings:
r=8 all-linear, 30 steps of 4, lr 1e-3, with `--quantize nf4`), then held-out loss and greedy exact match on the
100 test rows for every way a user can run that adapter:

- nf4+adapter          the 4-bit base with the adapter unmerged: what it was trained on
- merged-nf4-bf16      `lorakit merge` (the default for a QLoRA adapter): the 4-bit base dequantized to fp32, the
                       delta added in fp32, rounded once to bf16 (core/qlora_merge.py)
- gguf-bf16            that merged model through `lorakit export --outtype bf16`, read back by transformers
- merged-full-bf16     the same adapter merged into the full-precision base instead (`--base-quant none
                       --save-dtype bfloat16`): the weights the adapter never saw
- base-nf4, base-full  the two bases without the adapter (the task's starting point)

Every model computes in fp32 (bf16 weights are widened exactly), so the cases differ by their weights only; the
4-bit base is dequantized to fp32 once (core/qlora_merge.dequantize_fp32: the values its layers dequantize to on
every call, tests/unit/test_qlora_merge.py; on-the-fly dequantization made one 4-bit evaluation take 9 minutes on
the shared 2 cores). Each line also says how many answers differ from nf4+adapter's. --adapter reuses an adapter
an earlier run of this script trained (its metrics.jsonl gives the training numbers). Note: the embedded model's own checkpoint is a Q4_1
GGUF (models.EMBEDDED_GGUF), so its "full-precision base" is that file dequantized; NF4 re-quantizes it.

    PYTHONPATH=src python bench/qlora_quality.py [--out bench/results/qlora_quality_cpu-2core_DATE.jsonl]
One JSON line per case (machine cpu-2core, date), printed and appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo"
CASES = ("nf4+adapter", "merged-nf4-bf16", "gguf-bf16", "merged-full-bf16", "base-nf4", "base-full")
MAX_NEW = 12  # the demo's --max-new-tokens (answers are 10 characters)


def lorakit(*argv) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "lorakit", *map(str, argv)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"lorakit {argv[0]} failed: {p.stderr[-3000:]}")


def train(work: Path, threads: int, adapter: str | None) -> dict:
    out = Path(adapter) if adapter else work / "qlora"
    if not adapter:
        lorakit("train", "--model", "embedded", "--data", DATA / "train.jsonl", "--config", DATA / "lora.yaml",
                "--quantize", "nf4", "--threads", threads, "--quiet", "-o", out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"adapter": out, "steps": len(rows), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "train_s": round(rows[-1]["seconds"], 1), "tokens_per_s": round(rows[-1]["tokens_per_s"], 1)}


def model_for(case: str, work: Path, adapter: Path):
    """(model, tokenizer) for `case`, computing in fp32."""
    from lorakit import load_adapter
    from lorakit.models import load_base

    if case in ("nf4+adapter", "base-nf4"):
        from lorakit.core.qlora_merge import dequantize_fp32

        model, tok = load_base("embedded", dtype="float32", device="cpu", quant="nf4")
        if case == "nf4+adapter":
            load_adapter(model, adapter)
        dequantize_fp32(model)  # the same fp32 values, dequantized once instead of at every call
        return model, tok
    if case == "base-full":
        return load_base("embedded", dtype="float32", device="cpu")
    if case == "merged-nf4-bf16":
        lorakit("merge", "--model", "embedded", "--adapter", adapter, "--quiet", "-o", work / "merged-nf4")
        return load_base(str(work / "merged-nf4"), dtype="float32", device="cpu")
    if case == "gguf-bf16":
        lorakit("export", "--model", "embedded", "--adapter", adapter, "--outtype", "bf16", "--quiet",
                "-o", work / "merged.gguf")
        return load_base(str(work / "merged.gguf"), dtype="float32", device="cpu")
    if case == "merged-full-bf16":
        lorakit("merge", "--model", "embedded", "--adapter", adapter, "--base-quant", "none", "--save-dtype",
                "bfloat16", "--quiet", "-o", work / "merged-full")
        return load_base(str(work / "merged-full"), dtype="float32", device="cpu")
    raise ValueError(f"unknown case {case!r}; expected one of {list(CASES)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="append the JSON lines here too")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapter", help="an adapter this script trained before (skips the training)")
    args = ap.parse_args()
    import torch
    import transformers

    from lorakit.train.data import load_rows
    from lorakit.train.evaluate import evaluate, normalize, wilson

    torch.set_num_threads(args.threads)
    rows, _ = load_rows(DATA / "test.jsonl")
    work = Path(tempfile.mkdtemp(prefix="qlora_quality_"))
    tr = train(work, args.threads, args.adapter)
    common = {"bench": "qlora_quality", "machine": "cpu-2core", "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "transformers": transformers.__version__, "model": "embedded",
              "data": "data/demo", "train": {k: v for k, v in tr.items() if k != "adapter"},
              "lora": "r=8 alpha=16 all-linear (data/demo/lora.yaml)", "quantize": "nf4"}
    ref = None
    for case in args.cases.split(","):
        t0 = time.time()
        model, tok = model_for(case, work, tr["adapter"])
        rep = evaluate(model, tok, rows, "auto", MAX_NEW, batch_size=32, compare=False)
        answers = [normalize(e["after"]) for e in rep.examples]
        ref = answers if case == "nf4+adapter" else ref
        k = round(rep.after["accuracy"] * rep.n)
        line = {**common, "case": case, "n": rep.n, "loss": round(rep.after["loss"], 5),
                "accuracy": rep.after["accuracy"], "accuracy_95": [round(x, 4) for x in wilson(k, rep.n)],
                "answers_differ_from_nf4_adapter": None if ref is None else sum(a != b for a, b in zip(answers, ref)),
                "eval_s": round(time.time() - t0, 1)}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
