"""A real task end to end on the CPU: lorakit vs HF PEFT on data/classify (10-class routing, 1,200 chat rows,
one epoch), same settings, then held-out exact match of both adapters through `lorakit eval`.

Each case runs in its own process (peak RSS is that case's alone) and prints one JSON line: tokens/s over the
training steps (real tokens, padding not counted), wall seconds of training, peak RSS (VmHWM), held-out accuracy.
- lorakit: `lorakit train` as a user runs it (the one loop; length-grouped batches by default).
- lorakit-nogroup: the same with --no-group-by-length (plain shuffled batches, as PEFT gets them).
- lorakit-noshare: the same with --no-share-prefix (every row's shared head computed per row, as PEFT does).
- peft: PEFT 0.21 on the same base, the same rows rendered by the same chat template, the same shuffled batches,
  AdamW at the same learning rate, linear warm-up and cosine decay, loss from the model (labels=...), as users of
  transformers' Trainer run it.

    python bench/train_task.py [--cases lorakit,peft] [--r 16] [--targets q_proj,v_proj] [--lr 2e-4] [--limit N]
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
DATA = ROOT / "data" / "classify"
sys.path.insert(0, str(ROOT / "bench"))
from train_speed import machine, peak_rss_mib  # noqa: E402


def _rows(path: Path, limit: int) -> Path:
    if not limit:
        return path
    out = Path(tempfile.mkdtemp()) / path.name
    out.write_text("".join(path.read_text().splitlines(True)[:limit]))
    return out


def run_lorakit(args, group: bool, share: bool = True, packed: bool = True) -> dict:
    out = Path(tempfile.mkdtemp()) / "ad"
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", "embedded", "--data", str(_rows(DATA / "train.jsonl",
           args.limit)), "--r", str(args.r), "--alpha", str(2 * args.r), "--targets", args.targets, "--lr",
           str(args.lr), "--epochs", "1", "--batch-size", str(args.batch), "--threads", str(args.threads),
           "--dropout", "0", "-o", str(out), "--quiet"] + ([] if group else ["--no-group-by-length"]) + \
        ([] if share else ["--no-share-prefix"]) + ([] if packed else ["--no-pack"])
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=ENV)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    rss = next(float(x.split()[-1]) / 1024 for x in p.stderr.splitlines() if "Maximum resident" in x)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"out": str(out), "tokens": rows[-1]["tokens"], "train_s": rows[-1]["seconds"],
            "tokens_per_s": rows[-1]["tokens"] / rows[-1]["seconds"], "peak_rss_mib": round(rss, 1),
            "process_s": round(time.time() - t0, 1), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "steps": len(rows)}


def run_peft(args) -> dict:
    """In this process (the --case child): PEFT trained as its users do."""
    import torch
    import peft

    from lorakit.models import load_base
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.batches import MicroBatches
    from lorakit.train.loop import lr_at

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_base("embedded", dtype="float32", device="cpu")
    rows, _ = load_rows(_rows(DATA / "train.jsonl", args.limit))
    ex = build_examples(tok, rows)
    targets = args.targets.split(",") if "," in args.targets or args.targets.endswith("proj") else args.targets
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                       target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    mb = MicroBatches(ex, args.batch, 0, tok.pad_token_id, group_by_length=False)  # the same shuffled batches
    steps = mb.per_epoch
    warm = int(0.05 * steps)
    tokens, losses = 0, []
    t0 = time.perf_counter()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, steps, warm, args.lr)
        b = mb.get(s)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += int(b["attention_mask"].sum())
    secs = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp()) / "peft_ad"
    model.save_pretrained(out)
    return {"out": str(out), "tokens": tokens, "train_s": secs, "tokens_per_s": tokens / secs,
            "peak_rss_mib": round(peak_rss_mib(), 1), "loss_first": losses[0], "loss_last": losses[-1],
            "steps": steps}


def accuracy(adapter: str, limit: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "lorakit", "eval", "--model", "embedded", "--adapter", adapter, "--data",
               str(DATA / "test.jsonl"), "--max-new-tokens", "6", "--json", f"{d}/r.json"] + \
            (["--limit", str(limit)] if limit else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        rep = json.loads(Path(f"{d}/r.json").read_text())
    return rep


ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="lorakit,lorakit-nopack,peft")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=0, help="first N rows only (a dry run)")
    ap.add_argument("--out", help="append the JSON lines here too")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child: PEFT training
        print(json.dumps(run_peft(args)), flush=True)
        return 0
    lines = []
    for case in args.cases.split(","):
        if case == "peft":
            cmd = [sys.executable, __file__, "--case", "peft"] + [f"--{k}={v}" for k, v in
                                                                  (("r", args.r), ("targets", args.targets),
                                                                   ("lr", args.lr), ("batch", args.batch),
                                                                   ("threads", args.threads), ("limit", args.limit))]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": str(args.threads)})
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(p.stdout.strip().splitlines()[-1])
        else:
            res = run_lorakit(args, group=case != "lorakit-nogroup", share=case != "lorakit-noshare",
                              packed=case != "lorakit-nopack")
        rep = accuracy(res.pop("out"), min(args.limit, 200) if args.limit else 0)
        m = {k: v for k, v in rep.items() if k != "examples"}
        rec = {"bench": "train_task", "task": "data/classify (10-class routing)", "case": case, "r": args.r,
               "targets": args.targets, "lr": args.lr, "batch": args.batch, "epochs": 1, **res,
               "tokens_per_s": round(res["tokens_per_s"], 1), "heldout": m, "threads": args.threads,
               "machine": machine(), "load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(rec), flush=True)
        lines.append(rec)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
