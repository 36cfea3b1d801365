"""GPU training throughput and memory: lorakit's fast path against HF PEFT, same process, same data.

    PYTHONPATH=src python bench/gpu_train.py --out results_dir [--runs SPEC ...] [--deadline S]

A run SPEC is CASE/TOOL[/k=v,...]. lorakit variants: compile=0, fuse=0, wide=0 (round-1 layouts),
mlp=1 (fused SwiGLU+LoRA MLP kernels: less memory, slower on H100), ce=0 (compiled plain-torch loss
chunks instead of the Triton kernel), rec=N|all|match (recomputed layers), opts=cdt|mat (Inductor coordinate-descent tuning /
max-autotune), attn=BACKEND+..., prof=1 (one profiled step, kernel families in the JSON). PEFT variants: bf16=1
(adapters in bf16), liger=1 (Liger kernels), kbit=1 (4-bit case: peft.prepare_model_for_kbit_training), ckpt=0
(no gradient checkpointing: PEFT's defaults); PEFT's 4-bit case quantizes with bitsandbytes (Linear4bit NF4, double
quantization, bf16 compute). lorakit's 4-bit cases (8b-q4*): lib=auto|bnb|own|torchao (NF4Weight's library),
mem=1 (per-phase allocated peaks); both sides train at a constant learning rate of 1e-4 on the same token ids.

Models are random-weight Llama shapes (built on the meta device, materialised on the GPU, normal(0,
0.02) weights, norms around 1), bf16 weights, LoRA r=16 alpha=32 dropout 0 on every linear layer but
the head, AdamW (fused) on the trainable tensors, fixed-length random tokens (no padding), labels =
inputs. Each run: `--warmup` steps (the first includes compilation), then `--steps` timed steps;
step time is the median. peak_gib is the peak allocated over the timed steps (steady state);
peak_gib_warmup the peak over the warm-up steps (compilation and Triton autotuning transients).
One JSON line per run on stdout (and in OUT/gpu_train.jsonl), a table last.

FLOPs per token (model FLOPs, recomputation not counted): LoRA 4N + 6N_lora + 6 L s h_attn, full
fine-tuning 6N + 6 L s h_attn, where N counts every matmul weight (lm_head included), N_lora the
adapters' A and B, and 6 L s h_attn is causal attention (QK^T and PV, forward 2 L s h_attn, backward
twice that). mfu = FLOPs/token x tokens/s / 989e12 (H100 SXM dense bf16); mfu_vs_gemm divides by the
bf16 matmul rate measured in the same run instead.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

SHAPES = {
    "llama-1b": dict(hidden=2048, mlp=8192, layers=16, heads=32, kv=8, vocab=128256, tie=True),
    "llama-8b": dict(hidden=4096, mlp=14336, layers=32, heads=32, kv=8, vocab=128256, tie=False),
    "tiny": dict(hidden=64, mlp=128, layers=2, heads=4, kv=2, vocab=512, tie=True),  # CPU dry run
}
CASES = {  # name: (shape, batch, seq, mode, checkpointing in the HF run)
    "1b": ("llama-1b", 8, 2048, "lora", False),
    "1b-ckpt": ("llama-1b", 8, 2048, "lora", True),
    "1b-full-ckpt": ("llama-1b", 8, 2048, "full", True),
    "8b": ("llama-8b", 4, 2048, "lora", False),
    "8b-ckpt": ("llama-8b", 4, 2048, "lora", True),
    "8b-q4": ("llama-8b", 1, 2048, "qlora", True),  # issue 24: 4-bit base, batch 1 x 2048
    "8b-q4-b2": ("llama-8b", 2, 2048, "qlora", True),  # issue 24: batch 2 x 2048 (fixed-length rows, no padding)
    "tiny": ("tiny", 2, 64, "lora", False),
    "tiny-full-ckpt": ("tiny", 2, 64, "full", True),
    "tiny-q4": ("tiny", 2, 64, "qlora", True),
    "tiny-q4-b1": ("tiny", 1, 64, "qlora", True),
}
DEFAULT_RUNS = [  # most important first: a deadline skips the tail
    "1b/peft", "1b/lorakit/prof=1", "8b-ckpt/peft", "8b-ckpt/lorakit", "1b-ckpt/peft", "1b-full-ckpt/peft",
    "1b/lorakit/wide=0", "1b-ckpt/lorakit/rec=all", "1b-full-ckpt/lorakit", "1b-full-ckpt/lorakit/rec=match",
    "8b-ckpt/lorakit/rec=match", "1b/lorakit/compile=0",
]
COMPILE_OPTIONS = {"cdt": "coordinate_descent_tuning", "mat": "max_autotune"}  # variant opts=cdt+mat
PEAK_BF16 = 989e12
R, ALPHA = 16, 32
DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def mem(kind: str) -> int:
    if DEV != "cuda":
        return 0
    return torch.cuda.memory_allocated() if kind == "now" else torch.cuda.max_memory_allocated()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models
def build(shape: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=s["tie"], attn_implementation="sdpa",
                      use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16 if DEV == "cuda" else torch.float32).to_empty(device=DEV)
    model.tie_weights()
    g = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(1.0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(DEV)  # fp32 inv_freq
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def flops_per_token(shape: str, seq: int, mode: str) -> float:
    s = SHAPES[shape]
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    q, kv = s["heads"] * hd, s["kv"] * hd
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, s["mlp"]), (h, s["mlp"]), (s["mlp"], h)]
    n = s["layers"] * sum(i * o for i, o in per_layer) + s["vocab"] * h
    attn = 6 * s["layers"] * seq * q
    if mode == "full":
        return 6 * n + attn
    n_lora = s["layers"] * sum(R * (i + o) for i, o in per_layer)
    return 4 * n + 6 * n_lora + attn


# ---------------------------------------------------------------- the two tools
def setup_peft(model, mode: str, ckpt: bool, variant: dict):
    """PEFT at its defaults (fp32 adapters), or as its strongest users run it: bf16=1 keeps the adapters in the
    model's dtype (autocast_adapter_dtype=False), liger=1 first patches the model with Liger kernels
    (liger_kernel.transformers.apply_liger_kernel_to_llama: fused RMSNorm, RoPE, SwiGLU, linear cross-entropy)."""
    if variant.get("liger") == "1":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    if mode == "qlora":
        bnb_quantize(model)
        if variant.get("kbit") == "1":  # the QLoRA recipe's helper: norms, embeddings and head to fp32
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=variant.get("bf16") != "1")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5 if mode == "full" else 1e-4, fused=DEV == "cuda")

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return model, opt, loss_fn, {}


def bnb_quantize(model) -> None:
    """PEFT's QLoRA base: every decoder linear layer as bitsandbytes Linear4bit (NF4, double quantization,
    bf16 compute), as transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16) loads it; the head and embeddings stay bf16."""
    import gc

    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
                    setattr(parent, name, q.to(DEV))  # quantized on the way to the device
                    del child
    model.is_loaded_in_4bit = True
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def setup_lorakit(model, mode: str, ckpt: bool, variant: dict):
    from lorakit import LoraConfig, add_adapter
    from lorakit.train import fast

    if mode == "lora":
        add_adapter(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, targets="all-linear"))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    n_layers = len(model.model.layers)
    rec = variant.get("rec", "0")
    rec = n_layers if rec == "all" else int(rec)
    backends = tuple(b for b in variant.get("attn", "").split("+") if b)
    opts = {k: True for k in (COMPILE_OPTIONS[o] for o in variant.get("opts", "").split("+") if o)}
    torch._dynamo.reset()  # each run compiles afresh (compile options differ between runs)
    fm = fast.prepare(model, compile=variant.get("compile", "1") == "1", recompute_layers=rec,
                      fuse=variant.get("fuse", "1") == "1", wide=variant.get("wide", "1") == "1",
                      attn_backends=backends, fused_mlp=variant.get("mlp", "0") == "1",
                      ce_kernel=variant.get("ce", "1") == "1", compile_options=opts or None)
    fm.train()
    opt = fast.adamw(fm, lr=1e-5 if mode == "full" else 1e-4)
    return fm, opt, fm, {"recompute_layers": rec, "gqa": fm.spec.gqa, "chunk": fm.chunk,
                         "fused_mlp": fm.spec.fused_mlp, "ce_kernel": variant.get("ce", "1") == "1"}


def setup_lorakit_qlora(model, mode: str, ckpt: bool, variant: dict):
    """QLoRA as `lorakit train --quantize nf4` runs it on CUDA, in process (the CLI would save and reload the 16 GB
    random model): every decoder linear in NF4 through `lib=` (auto: bitsandbytes' kernels; own; torchao), LoRA r=16
    on all of them with fp32 masters (the loop's), AdamW, and the loop's plain backend (train/backends.py: HF
    checkpointing on every layer, the input embedding in host memory, the chunked in-place loss). mem=1 records the
    allocated peak of each phase (forward, backward, optimizer) of every step."""
    from lorakit import LoraConfig, add_adapter
    from lorakit.core.nf4 import quantize_model
    from lorakit.train.backends import PlainBackend

    lib = variant.get("lib", "auto")
    quantize_model(model, "all-linear", lib=lib)
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    add_adapter(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, targets="all-linear"))
    for p in model.parameters():  # the loop's fp32 adapter masters
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    backend = PlainBackend(model, recompute="all" if variant.get("rec", "all") == "all" else int(variant["rec"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEV == "cuda")
    phases: list = []

    def loss_fn(ids):
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "unpadded": True}
        if variant.get("mem") != "1" or DEV != "cuda":
            return backend.loss(batch, float(ids.numel() - ids.shape[0]))[0]
        torch.cuda.reset_peak_memory_stats()
        loss = backend.loss(batch, float(ids.numel() - ids.shape[0]))[0]
        phases.append({"forward_peak_gib": round(mem("peak") / 2**30, 3), "after_forward_gib": round(mem("now") / 2**30, 3)})
        return PhaseLoss(loss, phases)
    from lorakit.kernels import nf4_lib
    return model, PhaseOpt(opt, phases), loss_fn, {"quant": "nf4", "lib": nf4_lib.resolve(lib, DEV), "phases": phases,
                                                   "host_embedding": backend.host_embedding is not None}


class PhaseLoss:
    """A loss whose backward records the allocated peak of the backward pass (mem=1)."""

    def __init__(self, loss, phases):
        self.loss, self.phases = loss, phases

    def backward(self):
        torch.cuda.reset_peak_memory_stats()
        self.loss.backward()
        self.phases[-1].update(backward_peak_gib=round(mem("peak") / 2**30, 3))

    def __float__(self):
        return float(self.loss)


class PhaseOpt:
    """The optimizer, recording the allocated peak of its step (mem=1)."""

    def __init__(self, opt, phases):
        self.opt, self.phases = opt, phases

    def step(self):
        if self.phases and DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.opt.step()
        if self.phases and DEV == "cuda":
            self.phases[-1].update(optimizer_peak_gib=round(mem("peak") / 2**30, 3))

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


# ---------------------------------------------------------------- the user path: `lorakit train`
def run_cli(case: str, variant: dict, args, env: dict) -> dict:
    """`python -m lorakit train` in a subprocess on the same random model (saved as a Hugging Face dir) and the
    same token ids (a pre-tokenized JSONL file, rows of `seq` tokens, loss on every token): what a user runs.
    Step times and per-step memory peaks come from the run's metrics.jsonl (the loop records them)."""
    import subprocess
    import tempfile

    from transformers import AutoTokenizer

    shape, batch, seq, mode, _ = CASES[case]
    steps = args.warmup + args.steps
    work = tempfile.mkdtemp(prefix="lorakit-cli-", dir=os.environ.get("TMPDIR"))
    model_dir = os.path.join(tempfile.gettempdir(), f"lorakit-bench-{shape}")  # saved once per shape and process
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        model = build(shape)
        model.save_pretrained(model_dir)
        del model
    from lorakit.models import embedded_dir

    tok_dir = os.environ.get("LORAKIT_BENCH_TOKENIZER") or embedded_dir()  # any tokenizer: the rows are token ids
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model_dir)
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    ids = torch.randint(0, SHAPES[shape]["vocab"], (batch, seq), device=DEV,
                        generator=torch.Generator(device=DEV).manual_seed(1)).cpu()
    with open(os.path.join(work, "data.jsonl"), "w") as f:  # one batch of rows: every step trains on the bench's batch
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    rec = variant.get("rec", "all" if mode == "qlora" else "0")  # QLoRA: every layer recomputed, as the peer
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", model_dir, "--data",
           os.path.join(work, "data.jsonl"), "-o", os.path.join(work, "out"), "--r", str(R), "--alpha", str(ALPHA),
           "--dropout", "0", "--targets", "all-linear", "--lr", "1e-4", "--batch-size", str(batch),
           "--max-steps", str(steps), "--max-len", str(seq), "--warmup-ratio", "0", "--max-grad-norm", "0",
           "--no-group-by-length", "--backend", variant.get("backend", "auto"), "--recompute", rec,
           "--dtype", "bfloat16", "--device", DEV]
    if variant.get("mlp") == "1":
        cmd += ["--fused-mlp"]
    if mode == "full":
        cmd += ["--full", "--lr", "1e-5"]
    if mode == "qlora":
        cmd += ["--quantize", "nf4"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    if p.returncode:
        raise RuntimeError(f"lorakit train exited {p.returncode}: {p.stderr[-600:]}")
    rows = [json.loads(x) for x in open(os.path.join(work, "out", "metrics.jsonl")) if '"loss"' in x]
    secs = [r["seconds"] for r in rows]
    times = [b - a for a, b in zip([0.0] + secs, secs)]
    timed = rows[args.warmup:]
    step = statistics.median(times[args.warmup:])
    tok_s = batch * seq / step
    fpt = flops_per_token(shape, seq, mode)
    backend_line = next((x for x in p.stderr.splitlines() if x.startswith("backend:")), "")
    return dict(tool="cli", case=case, variant=variant, shape=shape, mode=mode, batch=batch, seq=seq,
                tokens_per_s=round(tok_s, 1), step_ms=round(step * 1e3, 2),
                step_ms_all=[round(x * 1e3, 2) for x in times[args.warmup:]], first_step_s=round(times[0], 2),
                peak_gib=max(r.get("cuda_peak_alloc_gib", 0) for r in timed),
                reserved_gib=max(r.get("cuda_peak_reserved_gib", 0) for r in timed),
                peak_gib_warmup=max(r.get("cuda_peak_alloc_gib", 0) for r in rows[:args.warmup]),
                flops_per_token=fpt, mfu=round(fpt * tok_s / PEAK_BF16, 4),
                mfu_vs_gemm=round(fpt * tok_s / env["gemm_flops"], 4) if env.get("gemm_flops") else None,
                loss_first=round(rows[0]["loss"], 5), loss_last=round(rows[-1]["loss"], 5),
                losses=[round(r["loss"], 5) for r in rows], backend=backend_line, wall_s=round(wall, 1),
                command="lorakit " + " ".join(cmd[3:]), **env["ids"])


# ---------------------------------------------------------------- one run
def run(case: str, tool: str, variant: dict, args, env: dict, results: list) -> dict:
    if tool == "cli":
        return run_cli(case, variant, args, env)
    shape, batch, seq, mode, ckpt = CASES[case]
    ckpt = ckpt and variant.get("ckpt") != "0"  # peft/ckpt=0: PEFT at its defaults, no gradient checkpointing
    if variant.get("rec") == "match":
        variant = dict(variant, rec=str(match_recompute(case, results)))
    torch.manual_seed(0)
    model = build(shape)
    ids = torch.randint(0, SHAPES[shape]["vocab"], (batch, seq), device=DEV,
                        generator=torch.Generator(device=DEV).manual_seed(1))
    setup = setup_peft if tool == "peft" else setup_lorakit_qlora if mode == "qlora" else setup_lorakit
    model, opt, loss_fn, extra = setup(model, mode, ckpt, variant)
    static = mem("now")
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    peak_warm = 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # steady-state peak: compile/autotune transients of the first steps apart
            peak_warm = mem("peak")
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))  # syncs
        sync()
        times.append(time.perf_counter() - t0)
    peak = mem("peak")
    phases = extra.get("phases")
    if phases:  # mem=1 reset the peak at every phase: the step's peak is the largest phase's
        peak = max(v for ph in phases[args.warmup:] for k, v in ph.items() if k.endswith("_peak_gib")) * 2**30
        peak_warm = max(v for ph in phases[:args.warmup] for k, v in ph.items() if k.endswith("_peak_gib")) * 2**30
    reserved = torch.cuda.max_memory_reserved() if DEV == "cuda" else 0
    step = statistics.median(times[args.warmup:])
    tok_s = batch * seq / step
    fpt = flops_per_token(shape, seq, mode)
    res = dict(tool=tool, case=case, variant=variant, shape=shape, mode=mode, batch=batch, seq=seq,
               hf_gradient_checkpointing=ckpt if tool == "peft" else None,
               tokens_per_s=round(tok_s, 1), step_ms=round(step * 1e3, 2),
               step_ms_all=[round(t * 1e3, 2) for t in times[args.warmup:]], first_step_s=round(times[0], 2),
               peak_gib=round(peak / 2**30, 3), reserved_gib=round(reserved / 2**30, 3),
               peak_gib_warmup=round(peak_warm / 2**30, 3), losses=[round(x, 5) for x in losses],
               static_gib=round(static / 2**30, 3),
               flops_per_token=fpt, mfu=round(fpt * tok_s / PEAK_BF16, 4),
               mfu_vs_gemm=round(fpt * tok_s / env["gemm_flops"], 4) if env.get("gemm_flops") else None,
               loss_first=round(losses[0], 5), loss_last=round(losses[-1], 5), **extra, **env["ids"])
    if variant.get("prof") == "1":
        res["profile"] = profile_step(loss_fn, opt, ids, os.path.join(args.out, f"profile_{case}_{tool}.txt"))
    del model, opt, loss_fn, loss
    return res


def match_recompute(case: str, results: list) -> int:
    """Layers to recompute so that lorakit's peak fits under PEFT's for this case, estimated from
    the lorakit run without recomputation (per-layer saved bytes = (peak - static) / layers)."""
    shape, batch, seq = CASES[case][:3]
    prev = [r for r in results if r.get("case") == case and "peak_gib" in r]
    peft = next((r for r in prev if r["tool"] == "peft"), None)
    mine = next((r for r in prev if r["tool"] == "lorakit" and r.get("recompute_layers") == 0), None)
    n = SHAPES[shape]["layers"]
    if peft is None or mine is None:
        return n
    per_layer = (mine["peak_gib"] - mine["static_gib"]) / n
    kept = batch * seq * SHAPES[shape]["hidden"] * 2 / 2**30  # a recomputed layer keeps its input
    over = mine["peak_gib"] - 0.97 * peft["peak_gib"]
    return max(0, min(n, math.ceil(over / max(per_layer - kept, 1e-6))))


def profile_step(loss_fn, opt, ids, path: str) -> dict:
    """Device time of one step by kernel family; the full table goes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        loss_fn(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
    return profile_families(prof, path)


def profile_families(prof, path: str) -> dict:
    """A finished profile's device time by kernel family (ms); the full table goes to `path`."""
    fam: dict[str, float] = {}
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t <= 0 or ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
            continue
        k = ev.key.lower()
        f = ("lorakit kernels (triton)" if any(w in k for w in ("swiglu_lora", "ce_inplace")) else
             "attention" if any(w in k for w in ("flash", "fmha", "attention", "sdpa", "cudnn")) else
             "matmul" if any(w in k for w in ("gemm", "nvjet", "cutlass", "sm90", "xmma", "matmul")) else
             "fused-elementwise (triton)" if k.startswith("triton") else "other")
        fam[f] = fam.get(f, 0.0) + t / 1e3
        rows.append((t / 1e3, ev.count, ev.key[:120], f))
    rows.sort(reverse=True)
    with open(path, "w") as fh:
        fh.write(f"{'ms':>9} {'calls':>6}  family / kernel\n")
        for t, c, key, f in rows:
            fh.write(f"{t:9.3f} {c:6d}  {f:28s} {key}\n")
    return {k: round(v, 2) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])}


class MemTrace:
    """Variant snap=1: every CUDA allocation of a run recorded with its Python stack
    (torch.cuda.memory._record_memory_history); `report()` replays the trace and lists what was live at the run's
    highest allocated moment, grouped by the innermost frame in our code or a library's (lorakit, peft, liger,
    transformers, bench, torch.optim, inductor's generated code). Costs host time: timings of such a run don't count."""
    KEEP = ("lorakit", "peft", "liger", "transformers", "bench/", "torch/optim", "torchinductor", "bitsandbytes",
            "torchao")

    def __init__(self, on: bool, path: str, max_entries: int = 4_000_000):
        self.on = on and DEV == "cuda"
        self.path, self.max_entries = path, max_entries

    def start(self) -> None:
        if self.on:
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")

    def site(self, frames: list) -> str:
        for f in frames:  # innermost first
            name = f.get("filename", "")
            if any(k in name for k in self.KEEP):
                return f"{'/'.join(name.split('/')[-2:])}:{f.get('line')} {f.get('name')}"
        return "other"

    def report(self, top: int = 25) -> dict | None:
        if not self.on:
            return None
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        ev = snap["device_traces"][torch.cuda.current_device()]
        frees = ("free_requested", "free_completed")

        def replay(stop: int | None):
            live, cur, best, at = {}, 0, -1, -1
            for i, e in enumerate(ev):
                if e["action"] == "alloc":
                    live[e["addr"]] = e
                    cur += e["size"]
                elif e["action"] in frees and e["addr"] in live:
                    cur -= live.pop(e["addr"])["size"]
                if cur > best:
                    best, at = cur, i
                if i == stop:
                    break
            return live, best, at
        _, best, at = replay(None)
        live, _, _ = replay(at)
        sites: dict[str, list] = {}
        for e in live.values():
            s = sites.setdefault(self.site(e.get("frames", [])), [0, 0])
            s[0] += e["size"]
            s[1] += 1
        rows = sorted(sites.items(), key=lambda kv: -kv[1][0])
        with open(self.path, "w") as fh:
            fh.write(f"peak of the replayed trace {best / 2**30:.3f} GiB at event {at} of {len(ev)}; "
                     f"the allocation that reached it: {self.site(ev[at].get('frames', []))}\n")
            for k, (b, n) in rows:
                fh.write(f"{b / 2**30:9.4f} GiB {n:6d}  {k}\n")
        return {"peak_gib": round(best / 2**30, 3), "events": len(ev), "truncated": len(ev) >= self.max_entries,
                "reached_by": self.site(ev[at].get("frames", [])),
                "top": [[k, round(b / 2**30, 4), n] for k, (b, n) in rows[:top]]}


# ---------------------------------------------------------------- ceilings
def micro() -> dict:
    """Measured bf16 matmul rate, copy bandwidth, and SDPA forward+backward by backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bench(fn, n=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)

    out = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out["gemm_8192_tflops"] = round(2 * 8192**3 / bench(lambda: a @ a) / 1e12, 1)
    x, w = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16), a[:, :2048]
    out["gemm_16384x2048x8192_tflops"] = round(2 * 16384 * 2048 * 8192 / bench(lambda: x @ w.t()) / 1e12, 1)
    buf = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(buf)
    out["copy_gbs"] = round(2 * 2**30 / bench(lambda: dst.copy_(buf)) / 1e9, 1)
    del a, x, w, buf, dst
    for name, (b, hq, hkv, d) in {"1b": (8, 32, 8, 64), "8b": (4, 32, 8, 128)}.items():
        s = 2048
        q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fl = 3 * 2 * b * hq * s * s * d  # causal fwd 2*b*h*s^2*d, bwd twice that
        for be in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            for gqa in ("native", "expand"):
                def step():
                    k = kv if gqa == "native" else kv.repeat_interleave(hq // hkv, 1)
                    with sdpa_kernel([getattr(SDPBackend, be)]):
                        o = torch.nn.functional.scaled_dot_product_attention(
                            q, k, k, is_causal=True, enable_gqa=gqa == "native")
                    o.backward(torch.ones_like(o))
                try:
                    out[f"sdpa_{name}_{be.split('_')[0].lower()}_{gqa}_tflops"] = round(fl / bench(step, 5) / 1e12, 1)
                except RuntimeError as e:
                    out[f"sdpa_{name}_{be.split('_')[0].lower()}_{gqa}_tflops"] = f"n/a: {str(e)[:80]}"
    return out


def parse_run(spec: str) -> tuple[str, str, dict]:
    parts = spec.split("/")
    if len(parts) < 2 or parts[0] not in CASES or parts[1] not in ("peft", "lorakit", "cli"):
        raise ValueError(f"run spec {spec!r}: expected CASE/TOOL[/k=v,...], CASE in {list(CASES)}")
    variant = dict(kv.split("=", 1) for kv in parts[2].split(",")) if len(parts) > 2 and parts[2] else {}
    return parts[0], parts[1], variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds; later runs are skipped")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the tiny cases")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    t_start = time.time()
    runs = [parse_run(s) for s in args.runs]
    os.makedirs(args.out, exist_ok=True)
    import transformers

    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = None
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    env = {"ids": dict(device=dev, torch=torch.__version__, transformers=transformers.__version__, peft=peft_v,
                       date=time.strftime("%Y-%m-%d"))}
    if not args.no_micro and DEV == "cuda":
        m = micro()
        env["gemm_flops"] = m["gemm_8192_tflops"] * 1e12
        print(json.dumps({"micro": m, **env["ids"]}), flush=True)
    results: list = []
    path = os.path.join(args.out, "gpu_train.jsonl")
    for case, tool, variant in runs:
        if time.time() - t_start > args.deadline:
            res = dict(tool=tool, case=case, variant=variant, skipped="deadline")
        else:
            log(f"== {case} {tool} {variant}")
            try:
                res = run(case, tool, variant, args, env, results)
            except Exception as e:  # OOM or a failure in one run must not lose the others
                res = dict(tool=tool, case=case, variant=variant, error=f"{type(e).__name__}: {str(e)[:400]}")
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    table(results)


def table(results: list) -> None:
    peft = {r["case"]: r for r in results if r.get("tool") == "peft" and "tokens_per_s" in r}
    print(f"\n{'case':13s} {'tool':8s} {'variant':22s} {'tok/s':>9s} {'x PEFT':>7s} {'peak GiB':>9s} "
          f"{'MFU':>6s} {'step ms':>8s} {'loss0':>7s}")
    for r in results:
        v = ",".join(f"{k}={x}" for k, x in r.get("variant", {}).items() if k != "prof")
        if "tokens_per_s" not in r:
            print(f"{r['case']:13s} {r['tool']:8s} {v:22s} {r.get('error') or r.get('skipped')}"[:160])
            continue
        ref = peft.get(r["case"])
        x = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        print(f"{r['case']:13s} {r['tool']:8s} {v:22s} {r['tokens_per_s']:9.0f} {x:>7s} {r['peak_gib']:9.2f} "
              f"{r['mfu']:6.3f} {r['step_ms']:8.1f} {r['loss_first']:7.3f}")


if __name__ == "__main__":
    main()
