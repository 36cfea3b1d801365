"""GPU training on real data (issue 23): chat rows of varying length, lorakit's loop against PEFT in one process.

    PYTHONPATH=src python bench/gpu_train_data.py --out DIR --tokenizer TOK_DIR [--runs CASE/TOOL ...]

Cases: `classify` (data/classify/train.jsonl rendered with the chat template: short rows, batch 32, 3 epochs) and
`long` (bench/make_long_rows.py: rows of 200-4,000 tokens, batch 8). The model is a random llama-1b shape
(bench/gpu_train.py `build`), LoRA r=16 alpha=32 dropout 0 on every linear layer but the head, AdamW lr 1e-4 with
lorakit's schedule (no warm-up, cosine), no clipping, rows in the same shuffled order for every tool.
Tools: `lorakit` (lorakit.train.loop.train, backend auto: fast on CUDA, packed rows by default; variant
pack=0), `peft-liger` (PEFT with bf16 adapters and Liger kernels, rows padded to the batch's longest), `peft`
(PEFT defaults: fp32 adapters, no Liger). Tokens are real tokens (padding not counted); tokens/s, the median and
worst step are over the steps after the first `warm` (per case); peaks (allocated, reserved) over those steps.
Variant snap=1 (either tool): the run's CUDA allocations recorded and what was live at its peak, by source line
(gpu_train.MemTrace; OUT/mem_CASE_TOOL.txt); prof=1: one warm step's kernels by family; amb=X (lorakit): the
compile partitioner's activation memory budget, `lorakit train --activation-memory-budget X` (default 1.0; lower
recomputes more).
One JSON line per run on stdout and in OUT/gpu_train_data.jsonl.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_train as gt  # noqa: E402  (build, setup_peft, SHAPES)

CASES = {  # name: (rows source, batch, epochs or None, max steps or 0, warm steps excluded, max_len)
    "classify": ("data/classify/train.jsonl", 32, 3.0, 0, 20, 512),
    "long": ("long", 8, 1.0, 0, 5, 4096),
    "classify40": ("data/classify/train.jsonl", 32, 3.0, 40, 10, 512),  # the chat rows, 40 steps (an 8b base)
    "classify-tiny": ("data/classify/train.jsonl", 8, 1.0, 12, 3, 512),  # CPU dry run
    "long-tiny": ("long", 2, 1.0, 6, 2, 4096),
}
gt.SHAPES["tiny-tok"] = dict(hidden=64, mlp=128, layers=2, heads=4, kv=2, vocab=49152, tie=True)  # CPU dry run
DEFAULT_RUNS = ["classify/peft-liger", "classify/lorakit", "long/peft-liger", "long/lorakit", "classify/peft"]


def examples(case: str, tok):
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.batches import trim_to_targets

    src, *_, max_len = CASES[case]
    if src == "long":
        import make_long_rows

        rows = make_long_rows.make(60 if case.endswith("tiny") else 240, seed=0)
    else:
        rows, _ = load_rows(src)
    return trim_to_targets(build_examples(tok, rows, "chat", max_len))


def steps_of(case: str, n_rows: int) -> int:
    import math

    _, batch, epochs, max_steps, *_ = CASES[case]
    return max_steps or math.ceil(epochs * math.ceil(n_rows / batch))


def summarize(case: str, tool: str, variant: dict, times: list, losses: list, tokens: list, peaks: list,
              reserved: list, extra: dict) -> dict:
    warm = CASES[case][4]
    t, n = times[warm:], tokens[warm:]
    med = statistics.median(t)
    return dict(case=case, tool=tool, variant=variant, steps=len(times), warm_steps=warm,
                tokens_per_s=round(sum(n) / sum(t), 1), real_tokens=sum(tokens), step_ms_median=round(med * 1e3, 2),
                step_ms_worst=round(max(t) * 1e3, 2), worst_over_median=round(max(t) / med, 3),
                peak_alloc_gib=round(max(peaks[warm:]), 3), peak_reserved_gib=round(max(reserved[warm:]), 3),
                peak_alloc_gib_warm=round(max(peaks[:warm] or [0]), 3),
                step_ms_all=[round(x * 1e3, 1) for x in times], losses=[round(x, 4) for x in losses], **extra)


class StepProfile:
    """variant prof=1: the device time of one warm step (the second-last: outside the timed ones) by kernel family.
    Stopping the profiler lands in the last warm step's time and the export waits for the end of the run (finish),
    so neither delays a timed step."""

    def __init__(self, case: str, variant: dict, out: str):
        self.on = variant.get("prof") == "1"
        self.at, self.prof, self.res = max(CASES[case][4] - 2, 1), None, None
        self.path = os.path.join(out, f"profile_{case}_{variant['tool']}.txt")

    def step(self, done: int) -> None:
        """Call after step `done` (1-based) finished."""
        if not self.on:
            return
        from torch.profiler import ProfilerActivity, profile

        if done == self.at:
            self.prof = profile(activities=[ProfilerActivity.CUDA if gt.DEV == "cuda" else ProfilerActivity.CPU])
            self.prof.start()
        elif done == self.at + 1 and self.prof is not None:
            gt.sync()
            self.prof.stop()

    def finish(self):
        """After the run: the profiled step's kernel families (None without prof=1)."""
        if self.prof is not None and self.res is None:
            self.res = gt.profile_families(self.prof, self.path)
        return self.res


def run_peft(case: str, variant: dict, tok, exs, shape: str, out: str) -> dict:
    from lorakit.config import TrainConfig
    from lorakit.train.batches import MicroBatches
    from lorakit.train.loop import lr_at

    _, batch, *_ = CASES[case]
    trace = gt.MemTrace(variant.get("snap") == "1", os.path.join(out, f"mem_{case}_{variant['tool']}.txt"))
    trace.start()
    torch.manual_seed(0)
    model = gt.build(shape)
    q4 = variant.get("q4") == "1"  # the 4-bit base (bitsandbytes NF4) with gradient checkpointing: PEFT's QLoRA
    model, opt, _, _ = gt.setup_peft(model, "qlora" if q4 else "lora", q4, {"bf16": "1", "liger": "1"} if
                                     variant["tool"] == "peft-liger" else {})
    cfg = TrainConfig(batch_size=batch, group_by_length=False)
    mb = MicroBatches(exs, batch, cfg.seed, tok.pad_token_id, False)
    total = steps_of(case, len(exs))
    times, losses, tokens, peaks, reserved = [], [], [], [], []
    prof = StepProfile(case, variant, out)
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, 0, 1e-4)
        b = mb.get(step)
        n_tok = int(b["attention_mask"].sum())
        b = {k: v.to(gt.DEV, non_blocking=True) for k, v in b.items()}
        gt.sync()
        if gt.DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        gt.sync()
        times.append(time.perf_counter() - t0)
        tokens.append(n_tok)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if gt.DEV == "cuda" else 0.0)
        reserved.append(torch.cuda.max_memory_reserved() / 2**30 if gt.DEV == "cuda" else 0.0)
        prof.step(step + 1)
    res = summarize(case, variant["tool"], variant, times, losses, tokens, peaks, reserved,
                    {"padded_tokens": sum(int(mb.get(s)["input_ids"].numel()) for s in range(total)),
                     "profile": prof.finish(), "mem_trace": trace.report()})
    del model, opt
    return res


def run_lorakit(case: str, variant: dict, tok, exs, shape: str, out: str) -> dict:
    from lorakit import LoraConfig
    from lorakit.config import TrainConfig
    from lorakit.train.loop import train

    _, batch, epochs, max_steps, *_ = CASES[case]
    trace = gt.MemTrace(variant.get("snap") == "1", os.path.join(out, f"mem_{case}_lorakit.txt"))
    trace.start()
    torch.manual_seed(0)
    model = gt.build(shape)
    q4 = variant.get("q4") == "1"  # the base in NF4 as `lorakit train --quantize nf4` holds it, every layer recomputed
    if q4:
        from lorakit.core.nf4 import quantize_model

        quantize_model(model, "all-linear")
    cfg = TrainConfig(lr=1e-4, batch_size=batch, epochs=epochs, max_steps=max_steps, warmup_ratio=0.0,
                      max_grad_norm=0.0, group_by_length=False, pack=variant.get("pack", "1") == "1",
                      backend=variant.get("backend", "auto"), recompute="all" if q4 else 0,
                      activation_memory_budget=float(variant.get("amb", 1.0)))  # `--activation-memory-budget`
    work = tempfile.mkdtemp(prefix="lorakit-bench-", dir=out)
    prof = StepProfile(case, variant, out)
    t0 = time.perf_counter()
    res = train(model, tok, exs, work, LoraConfig(r=gt.R, alpha=gt.ALPHA, dropout=0.0, targets="all-linear"), cfg,
                progress=False, save_final=False, on_step=lambda step, loss: prof.step(step))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl")) if '"loss"' in x]
    secs = [r["seconds"] for r in rows]
    times = [b - a for a, b in zip([0.0] + secs, secs)]
    toks = [b - a for a, b in zip([0] + [r["tokens"] for r in rows], [r["tokens"] for r in rows])]
    peaks = [r.get("cuda_peak_alloc_gib", 0.0) for r in rows]
    reserved = [r.get("cuda_peak_reserved_gib", 0.0) for r in rows]
    extra = {"backend": rows[0]["backend"], "setup_s": round(wall - secs[-1], 1), "profile": prof.finish(),
             "mem_trace": trace.report(),
             "train_config": json.load(open(os.path.join(work, "train_config.json"))).get("backend_reason")}
    del model, res
    return summarize(case, "lorakit", variant, times, [r["loss"] for r in rows], toks, peaks, reserved, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer dir (SmolLM2's)")
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=280.0, help="seconds; later runs are skipped")
    args = ap.parse_args()
    gt.DEV = args.device
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    os.makedirs(args.out, exist_ok=True)
    t_start, cache = time.time(), {}
    ids = dict(device=torch.cuda.get_device_name() if gt.DEV == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), shape=args.shape)
    for spec in args.runs:
        case, tool, *rest = spec.split("/")
        variant = dict(kv.split("=", 1) for kv in rest[0].split(",")) if rest else {}
        variant["tool"] = tool
        if time.time() - t_start > args.deadline:
            res = dict(case=case, tool=tool, variant=variant, skipped="deadline")
        else:
            print(f"== {spec}", file=sys.stderr, flush=True)
            if case not in cache:
                cache[case] = examples(case, tok)
            try:
                res = (run_lorakit(case, variant, tok, cache[case], args.shape, args.out) if tool == "lorakit" else
                       run_peft(case, variant, tok, cache[case], args.shape, args.out))
            except Exception as e:  # one failed run must not lose the others
                res = dict(case=case, tool=tool, variant=variant, error=f"{type(e).__name__}: {str(e)[:600]}")
            gc.collect()
            if gt.DEV == "cuda":
                torch.cuda.empty_cache()
        res.update(ids)
        print(json.dumps(res), flush=True)
        with open(os.path.join(args.out, "gpu_train_data.jsonl"), "a") as fh:
            fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
