"""QLoRA on two GPUs with FSDP2 (issue 28): `lorakit train --nproc 2 --parallel fsdp --quantize nf4`.

    LORAKIT_BENCH_TOKENIZER=/path/to/a/tokenizer PYTHONPATH=src python bench/gpu_qlora_fsdp.py --out DIR
    PYTHONPATH=src python bench/gpu_qlora_fsdp.py --dry-run --out DIR   # tiny shapes, CPU processes, gloo

Cases (one JSON line each, then a summary line against the goals):
  70b/fsdp2   a llama-70b-shaped random model (80 layers, hidden 8192, 64 heads, 8 KV heads, MLP 28672, vocab
              32000, as Llama-2-70B), 4-bit base, batch 2 x 2048 a GPU, r=16 on every linear, every layer
              recomputed: goal peak allocated <= 24 GiB a GPU, the loss falling; tokens/s and host memory
              reported (70b/fsdp2-b1: 1 x 2048 a GPU, the global batch 2 x 2048; `lorakit estimate --shards 2`
              predicts 26.4 GiB a GPU at 2 a GPU and 22.4 GiB at 1, without CPU offload). Its weights are never
              written (140 GB in bf16): the model directory holds a config with
              {"lorakit_random_weights": {"std": 0.02}} and each rank draws its shards' weights (train/shard_load).
  70b/fsdp2-offload   the same at 2 x 2048 a GPU with `--offload params`: the shards (4-bit base, adapters), their
              gradients and AdamW state in host memory (pinned), AdamW on the CPU; `lorakit estimate --shards 2
              --offload params` predicts the GPU peak and the host bytes a process (scripts/fsdp_offload_table.py).
  70b/fsdp2-replicate   2 x 2048 a GPU, adapters and their AdamW state whole on each GPU (`--adapter-state
              replicate`: one all-reduce of the adapters' gradients a step instead of gathers and reduce-scatters).
  8b-q/1, 8b-q/fsdp2, 8b-q/ddp2   llama-8b QLoRA, 4 x 2048 a GPU, recompute: goal fsdp2 >= 1.8x one GPU's
              tokens/s at <= its per-GPU peak (ddp2 beside it for reference; 8b-q/fsdp2-replicate: adapters whole,
              8b-q/fsdp2-offload: shards in host memory, for the choice of defaults).
tokens/s = global tokens a step / median step time after --warmup steps; peak_gib = the largest per-step peak
allocated over the timed steps and both ranks (the loop's metrics; "met" is null in a dry run), beside
`lorakit estimate`'s prediction for the case (estimate_gib: the memory model, --shards for FSDP);
host_peak_gib = the largest sum of the resident memory of the training processes (launcher, torchrun and
ranks), sampled every 0.2 s.
The data is `rows` fixed-length rows of random ids repeated each step (one global batch), so the loss falls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_dist  # noqa: E402  (model_dir: a random model saved with a tokenizer)
import gpu_train  # noqa: E402  (SHAPES)

R, ALPHA = 16, 32
SHAPE_70B = dict(hidden=8192, mlp=28672, layers=80, heads=64, kv=8, vocab=32000)
SHAPE_TINY_RANDOM = dict(hidden=64, mlp=128, layers=2, heads=4, kv=2, vocab=512)  # --dry-run's stand-in for 70b
OFFLOAD, REPLICATE = {"offload": "params"}, {"adapter_state": "replicate"}
CASES = {  # name: (shape, per-GPU batch, seq, processes, parallel[, FSDP options: TrainConfig fields])
    "70b/fsdp2": ("llama-70b-random", 2, 2048, 2, "fsdp"),
    "70b/fsdp2-b1": ("llama-70b-random", 1, 2048, 2, "fsdp"),  # global batch 2 x 2048: 1 a GPU
    "70b/fsdp2-offload": ("llama-70b-random", 2, 2048, 2, "fsdp", OFFLOAD),
    "70b/fsdp2-replicate": ("llama-70b-random", 2, 2048, 2, "fsdp", REPLICATE),
    "8b-q/1": ("llama-8b", 4, 2048, 1, None),
    "8b-q/fsdp2": ("llama-8b", 4, 2048, 2, "fsdp"),
    "8b-q/fsdp2-replicate": ("llama-8b", 4, 2048, 2, "fsdp", REPLICATE),
    "8b-q/fsdp2-offload": ("llama-8b", 4, 2048, 2, "fsdp", OFFLOAD),
    "8b-q/ddp2": ("llama-8b", 4, 2048, 2, "ddp"),
    "tiny-random/fsdp2": ("tiny-random", 2, 64, 2, "fsdp"),  # --dry-run
    "tiny-random/fsdp2-offload": ("tiny-random", 2, 64, 2, "fsdp", OFFLOAD),
    "tiny-q/1": ("tiny", 2, 64, 1, None),
    "tiny-q/fsdp2": ("tiny", 2, 64, 2, "fsdp"),
    "tiny-q/fsdp2-replicate": ("tiny", 2, 64, 2, "fsdp", REPLICATE),
}
GPU_RUNS = ["70b/fsdp2-offload", "70b/fsdp2", "70b/fsdp2-b1", "70b/fsdp2-replicate", "8b-q/1", "8b-q/fsdp2",
            "8b-q/fsdp2-replicate", "8b-q/fsdp2-offload", "8b-q/ddp2"]
DRY_RUNS = ["tiny-random/fsdp2", "tiny-random/fsdp2-offload", "tiny-q/1", "tiny-q/fsdp2", "tiny-q/fsdp2-replicate"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def random_dir(name: str, s: dict, work: str) -> str:
    """A model directory without weights: a Llama config marked for seeded random weights, and a tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    from lorakit.models import embedded_dir
    from lorakit.train.shard_load import RANDOM_KEY

    path = os.path.join(work, f"model-{name}")
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    cfg.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw[RANDOM_KEY] = {"std": 0.02}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    AutoTokenizer.from_pretrained(os.environ.get("LORAKIT_BENCH_TOKENIZER") or embedded_dir()).save_pretrained(path)
    return path


def data_file(vocab: int, rows: int, seq: int, work: str) -> str:
    path = os.path.join(work, f"data-{vocab}-{rows}x{seq}.jsonl")
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(1))
    with open(path, "w") as f:
        f.writelines(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist())
    return path


def host_peak(proc: subprocess.Popen, stop: threading.Event, out: list) -> None:
    """The largest summed RSS of `proc` and its descendants, sampled until `stop`."""
    top = 0
    while not stop.is_set():
        try:
            root = psutil.Process(proc.pid)
            procs = [root, *root.children(recursive=True)]
            top = max(top, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        stop.wait(0.2)
    out.append(top)


def run_case(case: str, args, work: str) -> dict:
    shape, batch, seq, nproc, parallel, *more = CASES[case]
    opts = {"offload": "none", "adapter_state": "shard", **(more[0] if more else {})}
    device = "cpu" if args.dry_run else "cuda"
    if shape.endswith("-random"):
        s = SHAPE_70B if shape.startswith("llama-70b") else SHAPE_TINY_RANDOM
        model = random_dir(shape, s, work)
    else:
        s = gpu_train.SHAPES[shape]
        model = gpu_dist.model_dir(shape, work, device)
    data = data_file(s["vocab"], batch * 2, seq, work)  # one 2-GPU global batch
    out = tempfile.mkdtemp(prefix=f"{case.replace('/', '-')}-", dir=work)
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", model, "--data", data, "-o", out, "--quantize", "nf4",
           "--r", str(R), "--alpha", str(ALPHA), "--dropout", "0", "--targets", "all-linear", "--lr", args.lr,
           "--batch-size", str(batch), "--max-steps", str(args.warmup + args.steps), "--max-len", str(seq),
           "--warmup-ratio", "0", "--max-grad-norm", "0", "--no-group-by-length", "--recompute", "all",
           "--dtype", "float32" if args.dry_run else "bfloat16", "--device", device, "--no-save"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--parallel", parallel]
    if parallel == "fsdp":
        cmd += ["--offload", opts["offload"], "--adapter-state", opts["adapter_state"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1 and not args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0, stop, host = time.time(), threading.Event(), []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watch = threading.Thread(target=host_peak, args=(p, stop, host))
    watch.start()
    try:
        _, err = p.communicate(timeout=args.case_timeout)
    finally:
        stop.set()
        watch.join()
        if p.poll() is None:
            p.kill()
    if p.returncode:
        raise RuntimeError(f"lorakit train exited {p.returncode}: {err[-1500:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]
    secs = [r["seconds"] for r in rows]
    times = [b - a for a, b in zip([0.0] + secs, secs)]
    step = statistics.median(times[args.warmup:])
    timed = rows[args.warmup:]
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    from lorakit.lab.estimate import arch_of, estimate, load_config

    pred = estimate(arch_of(load_config(model)), "qlora", R, batch, seq, "all-linear",
                    "float32" if args.dry_run else "bfloat16", True, shards=nproc if parallel == "fsdp" else 1,
                    offload=opts["offload"] == "params", adapter_state=opts["adapter_state"])
    losses = [round(r["loss"], 5) for r in rows]
    return dict(case=case, shape=shape, processes=nproc, parallel=parallel or "none", batch_per_gpu=batch, seq=seq,
                offload=opts["offload"], adapter_state=opts["adapter_state"],
                estimate_host_gib=round(pred.host / 2**30, 3),
                tokens_per_s=round(batch * nproc * seq / step, 1), step_ms=round(step * 1e3, 2),
                first_step_s=round(times[0], 2), peak_gib=max(r.get("cuda_peak_alloc_gib", 0) for r in timed),
                reserved_gib=max(r.get("cuda_peak_reserved_gib", 0) for r in timed),
                estimate_gib=round(pred.total / 2**30, 3), estimate=pred.to_dict(),
                host_peak_gib=round(host[0] / 2**30, 3) if host else None, losses=losses,
                loss_falls=losses[-1] < losses[0], sharded=cfg.get("sharded"), backend=cfg.get("backend"),
                wall_s=round(time.time() - t0, 1), command="lorakit " + " ".join(cmd[3:]))


def summary(res: dict, dry: bool) -> dict:
    out = {"summary": True}
    big = res.get("tiny-random/fsdp2") if dry else min(
        (r for k, r in res.items() if k.startswith("70b/") and "peak_gib" in r),
        key=lambda r: (-r["batch_per_gpu"], -r["tokens_per_s"]) if r["peak_gib"] <= 24 else (1e9 + r["peak_gib"], 0),
        default=None)  # within the goal: the largest batch a GPU, then the fastest
    if big and "peak_gib" in big:
        met = None if dry else big["peak_gib"] <= 24 and big["loss_falls"]
        out["70b"] = {"case": big["case"], "offload": big["offload"], "adapter_state": big["adapter_state"],
                      "peak_gib": big["peak_gib"], "goal_peak_gib": 24, "met": met,
                      "tokens_per_s": big["tokens_per_s"], "host_peak_gib": big["host_peak_gib"]}
    one, two = (res.get(f"{'tiny-q' if dry else '8b-q'}/{k}") for k in ("1", "fsdp2"))
    if one and two and "tokens_per_s" in one and "tokens_per_s" in two:
        speed = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        out["8b"] = {"speedup": speed, "goal_speedup": 1.8, "peak_gib_1": one["peak_gib"],
                     "peak_gib_2": two["peak_gib"], "met": None if dry else speed >= 1.8 and two["peak_gib"] <= one["peak_gib"]}
        out["8b"]["variants"] = {k: {"speedup": round(r["tokens_per_s"] / one["tokens_per_s"], 3), "peak_gib": r["peak_gib"]}
                                 for k, r in res.items() if k.startswith(two["case"] + "-") and "tokens_per_s" in r}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON lines (results.jsonl)")
    ap.add_argument("--runs", nargs="*", help=f"cases (default: {GPU_RUNS}; --dry-run: {DRY_RUNS})")
    ap.add_argument("--work", help="folder for models and runs (default: a temporary one)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--case-timeout", type=float, default=1500)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU processes (gloo)")
    args = ap.parse_args()
    runs = args.runs or (DRY_RUNS if args.dry_run else GPU_RUNS)
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="qlora-fsdp-")
    ids = dict(device="cpu" if args.dry_run else torch.cuda.get_device_name(),
               gpus=0 if args.dry_run else torch.cuda.device_count(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    res = {}
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for case in runs:
            log(f"== {case}")
            try:
                res[case] = {**run_case(case, args, work), **ids}
            except Exception as e:  # one JSON line either way: a failed case says why
                res[case] = {"case": case, "error": f"{type(e).__name__}: {e}"[-2000:], **ids}
            print(json.dumps(res[case]), flush=True)
            f.write(json.dumps(res[case]) + "\n")
            f.flush()
        line = {**summary(res, args.dry_run), **ids}
        print(json.dumps(line), flush=True)
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
