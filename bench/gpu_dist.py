"""Training past one GPU: `lorakit train` on 1 GPU vs 2 (DDP, FSDP2), tokens/s and per-GPU peak memory.

    LORAKIT_BENCH_TOKENIZER=/path/to/a/tokenizer PYTHONPATH=src python bench/gpu_dist.py --out DIR
    PYTHONPATH=src python bench/gpu_dist.py --dry-run --out DIR      # tiny shapes, CPU processes, gloo (CI)

Each case runs what a user runs, `python -m lorakit train` (with `--nproc 2` for two GPUs), on a random-weight
Llama shape saved once as a Hugging Face dir (gpu_train.py's `build`/SHAPES) and a pre-tokenized data file
(`{"input_ids": [...]}` rows of `seq` tokens, loss on every token); LoRA r=16 alpha=32 on every linear layer
but the head, fast backend (compiled on CUDA), no gradient clipping, bf16 weights. Cases (per-GPU batch fixed):
  1b/1, 1b/ddp2            llama-1b, LoRA, 8 x 2048 a GPU: tokens/s on 2 GPUs vs 1 (goal >= 1.85x)
  8b/1, 8b/fsdp2           llama-8b, LoRA, 1 x 2048 a GPU, every layer recomputed: per-GPU peak (goal <= 0.6x)
  8b-full/1, 8b-full/fsdp2 the same with full fine-tuning (weights, gradients and AdamW state all sharded)
tokens/s = global tokens a step / median step time over the timed steps (the loop's metrics.jsonl, after
--warmup steps that include compilation); peak_gib = the largest per-step peak allocated over the timed steps
and over ranks (the loop reduces it with MAX). One JSON line per case, then a summary line with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_train  # noqa: E402  (build, SHAPES)

R, ALPHA = 16, 32
CASES = {  # name: (shape, per-GPU batch, seq, mode, recompute, processes, parallel)
    "1b/1": ("llama-1b", 8, 2048, "lora", "0", 1, None),
    "1b/ddp2": ("llama-1b", 8, 2048, "lora", "0", 2, "ddp"),
    "8b/1": ("llama-8b", 1, 2048, "lora", "all", 1, None),
    "8b/fsdp2": ("llama-8b", 1, 2048, "lora", "all", 2, "fsdp"),
    "8b-full/1": ("llama-8b", 1, 2048, "full", "all", 1, None),
    "8b-full/fsdp2": ("llama-8b", 1, 2048, "full", "all", 2, "fsdp"),
    "tiny/1": ("tiny", 2, 64, "lora", "0", 1, None),  # --dry-run: CPU processes, gloo
    "tiny/ddp2": ("tiny", 2, 64, "lora", "0", 2, "ddp"),
    "tiny/fsdp2": ("tiny", 2, 64, "lora", "all", 2, "fsdp"),
    "tiny-full/fsdp2": ("tiny", 2, 64, "full", "all", 2, "fsdp"),
}
GPU_RUNS = ["1b/1", "1b/ddp2", "8b/1", "8b/fsdp2", "8b-full/1", "8b-full/fsdp2"]  # most important first
DRY_RUNS = ["tiny/1", "tiny/fsdp2"]
GOALS = {"1b": ("speedup", 1.85), "8b": ("peak_ratio", 0.6), "8b-full": ("peak_ratio", 0.6)}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def model_dir(shape: str, work: str, device: str) -> str:
    """A random model of `shape` saved once (weights and a tokenizer: any tokenizer, the rows are token ids)."""
    from transformers import AutoTokenizer

    from lorakit.models import embedded_dir

    path = os.path.join(work, f"model-{shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        gpu_train.DEV = device
        model = gpu_train.build(shape)
        model.save_pretrained(path)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        tok_dir = os.environ.get("LORAKIT_BENCH_TOKENIZER") or embedded_dir()
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def data_file(shape: str, rows: int, seq: int, work: str) -> str:
    path = os.path.join(work, f"data-{shape}-{rows}x{seq}.jsonl")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, gpu_train.SHAPES[shape]["vocab"], (rows, seq), generator=g)
    with open(path, "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    return path


def run_case(case: str, args, work: str) -> dict:
    shape, batch, seq, mode, rec, nproc, parallel = CASES[case]
    device = "cpu" if args.dry_run else "cuda"
    steps = args.warmup + args.steps
    model = model_dir(shape, work, device)
    data = data_file(shape, batch * 2, seq, work)  # one 2-GPU global batch: both runs train on these rows
    out = tempfile.mkdtemp(prefix=f"{case.replace('/', '-')}-", dir=work)
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", model, "--data", data, "-o", out,
           "--r", str(R), "--alpha", str(ALPHA), "--dropout", "0", "--targets", "all-linear",
           "--lr", "1e-5" if mode == "full" else "1e-4", "--batch-size", str(batch), "--max-steps", str(steps),
           "--max-len", str(seq), "--warmup-ratio", "0", "--max-grad-norm", "0", "--no-group-by-length",
           "--recompute", rec, "--dtype", "float32" if args.dry_run else "bfloat16", "--device", device, "--no-save"]
    if not args.dry_run:
        cmd += ["--backend", "fast"]
    if mode == "full":
        cmd += ["--full"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--parallel", parallel]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1 and not args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    wall = time.time() - t0
    if p.returncode:
        raise RuntimeError(f"lorakit train exited {p.returncode}: {p.stderr[-1500:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]
    secs = [r["seconds"] for r in rows]
    times = [b - a for a, b in zip([0.0] + secs, secs)]
    step = statistics.median(times[args.warmup:])
    timed = rows[args.warmup:]
    lines = p.stderr.splitlines()
    return dict(case=case, shape=shape, mode=mode, processes=nproc, parallel=parallel or "none",
                batch_per_gpu=batch, seq=seq, recompute=rec,
                tokens_per_s=round(batch * nproc * seq / step, 1), step_ms=round(step * 1e3, 2),
                step_ms_all=[round(x * 1e3, 2) for x in times[args.warmup:]], first_step_s=round(times[0], 2),
                peak_gib=max(r.get("cuda_peak_alloc_gib", 0) for r in timed),
                reserved_gib=max(r.get("cuda_peak_reserved_gib", 0) for r in timed),
                losses=[round(r["loss"], 5) for r in rows],
                backend=next((x for x in lines if x.startswith("backend:")), ""),
                parallel_line=next((x[x.index("parallel:"):] for x in lines if "parallel:" in x), ""),  # torchrun may prefix
                wall_s=round(wall, 1), command="lorakit " + " ".join(cmd[3:]))


def summary(results: dict) -> dict:
    """Per shape: 2 processes vs 1 at the same per-GPU batch, tokens/s and per-GPU peak, against the goals."""
    out = {"summary": True}
    for name in dict.fromkeys(c.split("/")[0] for c in results):
        one = results.get(f"{name}/1")
        two = results.get(f"{name}/ddp2") or results.get(f"{name}/fsdp2")
        if not one or not two or "tokens_per_s" not in one or "tokens_per_s" not in two:
            continue
        row = {"vs": f"{two['case']} / {one['case']}", "speedup": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
               "peak_ratio": round(two["peak_gib"] / one["peak_gib"], 3) if one["peak_gib"] else None}
        if name in GOALS:
            kind, goal = GOALS[name]
            value = row[kind]
            row["goal"] = f"{kind} {'>=' if kind == 'speedup' else '<='} {goal}"
            row["met"] = None if value is None else (value >= goal if kind == "speedup" else value <= goal)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--runs", nargs="*", help=f"cases (default: {GPU_RUNS}; --dry-run: {DRY_RUNS})")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=360.0, help="seconds; no case starts after this")
    ap.add_argument("--case-timeout", type=float, default=240.0, help="seconds a case may run")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU processes (gloo)")
    args = ap.parse_args(argv)
    runs = args.runs or (DRY_RUNS if args.dry_run else GPU_RUNS)
    unknown = [r for r in runs if r not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(CASES)}")
    os.makedirs(args.out, exist_ok=True)
    import transformers

    ids = dict(device="cpu" if args.dry_run else torch.cuda.get_device_name(),
               gpus=0 if args.dry_run else torch.cuda.device_count(), torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"))
    t_start = time.time()
    results: dict = {}
    path = os.path.join(args.out, "gpu_dist.jsonl")
    with tempfile.TemporaryDirectory(prefix="lorakit-dist-", dir=os.environ.get("TMPDIR")) as work:
        for case in runs:
            if time.time() - t_start > args.deadline:
                res = dict(case=case, skipped="deadline")
            else:
                log(f"== {case}")
                try:
                    res = run_case(case, args, work)
                except Exception as e:  # one failed case must not lose the others
                    res = dict(case=case, error=f"{type(e).__name__}: {str(e)[-1200:]}")
            res.update(ids)
            results[case] = res
            print(json.dumps(res), flush=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    s = {**summary(results), **ids, "seconds": round(time.time() - t_start, 1)}
    print(json.dumps(s), flush=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(s) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
