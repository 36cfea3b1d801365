"""CPU training speed: lorakit vs HF PEFT on the embedded model, same config, batch and data, same run.

Each case runs in its own subprocess (so peak RSS is that case's alone) and prints one JSON line:
tool, case, tokens_per_s (all tokens of the timed steps / their time), step_s, peak_rss_mib (VmHWM: the whole process,
base model included), loss_first/loss_last, and the machine.

    python bench/train_speed.py [--steps 6] [--warmup 2] [--r 16] [--batch 8] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["peft", "lorakit", "lorakit-nopack", "lorakit-nogroup", "lorakit-noshare"]  # also: lorakit-fast, lorakit-model (the loss)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"cpu-{os.cpu_count()}core-{mem:.0f}GiB ({platform.processor() or platform.machine()})"


def run_case(case: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lorakit import LoraConfig, add_adapter, load_base
    from lorakit.train.data import build_examples, collate, load_rows
    from lorakit.train.backends import causal_lm_loss

    model, tok = load_base("embedded", dtype="float32", device="cpu")
    rows, _ = load_rows(ROOT / "data" / "demo" / "train.jsonl")
    examples = build_examples(tok, rows[: args.batch * (args.steps + args.warmup)])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if case == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                           target_modules=targets))
        # PEFT as its users train it (and as transformers' Trainer does): the model's own loss from labels
        step_loss = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],  # noqa: E731
                                    labels=b["labels"]).loss
    elif case.startswith("lorakit") and case not in ("lorakit-fast", "lorakit-model"):  # the user path: the loop
        return run_loop(case, model, tok, examples, targets, args)
    else:
        add_adapter(model, LoraConfig(r=args.r, alpha=2 * args.r, targets=targets))
        if case == "lorakit-fast":
            from lorakit.train import fast

            fm = fast.prepare(model, compile=False)
            step_loss = lambda b: fm(b["input_ids"], labels=b["labels"])  # noqa: E731
        else:  # lorakit-model: the model-level loss without the loop
            step_loss = lambda b: causal_lm_loss(model, b)[0]  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, losses, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        b = collate(examples[i * args.batch:(i + 1) * args.batch], tok.pad_token_id)
        t = time.perf_counter()
        loss = step_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
            tokens.append(int(b["attention_mask"].sum()))
    step = statistics.median(times)
    return {"bench": "train_speed", "tool": case.split("-")[0], "case": case, "model": "SmolLM2-135M-Instruct",
            "dtype": "float32", "r": args.r, "targets": "all-linear", "batch": args.batch,
            "tokens_per_step": statistics.mean(tokens), "step_s": round(step, 4),
            "tokens_per_s": round(sum(tokens) / sum(times), 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "trainable": sum(p.numel() for p in params), "loss_first": losses[0], "loss_last": losses[-1],
            "threads": args.threads, "machine": machine(), "torch": torch.__version__}


def run_loop(case: str, model, tok, examples, targets, args) -> dict:
    """lorakit.train.loop.train on the same rows (it shuffles them; by default into length-grouped batches): step
    times and tokens from its metrics.jsonl, after the same warm-up steps."""
    import tempfile

    import torch

    from lorakit import LoraConfig
    from lorakit.config import TrainConfig
    from lorakit.train.loop import train

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as d:
        train(model, tok, examples, d, LoraConfig(r=args.r, alpha=2 * args.r, targets=targets, dropout=0.0),
              TrainConfig(lr=1e-4, max_steps=steps, batch_size=args.batch, warmup_ratio=0.0, max_grad_norm=0.0,
                          group_by_length=case != "lorakit-nogroup", share_prefix=case != "lorakit-noshare",
                          pack=case != "lorakit-nopack",
                          threads=args.threads), progress=False, save_final=False)
        rows = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    secs = [r["seconds"] for r in rows]
    times = [b - a for a, b in zip([0.0] + secs, secs)][args.warmup:]
    toks = [b - a for a, b in zip([0] + [r["tokens"] for r in rows], [r["tokens"] for r in rows])][args.warmup:]
    return {"bench": "train_speed", "tool": "lorakit", "case": case, "model": "SmolLM2-135M-Instruct",
            "dtype": "float32", "r": args.r, "targets": "all-linear", "batch": args.batch,
            "tokens_per_step": statistics.mean(toks), "step_s": round(statistics.median(times), 4),
            "tokens_per_s": round(sum(toks) / sum(times), 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "threads": args.threads,
            "machine": machine(), "torch": torch.__version__, "path": "lorakit.train.loop.train"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=1, help="run the cases this many times, interleaved")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    lines = []
    for rnd in range(args.rounds):
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--r", str(args.r), "--batch", str(args.batch), "--threads", str(args.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return p.returncode
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            rec["round"] = rnd
            rec["load_avg_1m"] = os.getloadavg()[0]
            print(json.dumps(rec), flush=True)
            lines.append(rec)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
