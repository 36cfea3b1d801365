"""NF4 (QLoRA base) on the embedded SmolLM2-135M: bytes before/after, reconstruction error, LM loss,
and bitsandbytes side by side when it is importable (pip install bitsandbytes; it runs on CPU).

    PYTHONPATH=src python bench/quant_memory.py [--device cpu|cuda] > bench/results/quant_memory-<machine>.jsonl

One JSON line per case.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import torch.nn as nn

from lorakit.models import load_base
from lorakit.core.nf4 import NF4Linear, quantize_model, weight_bytes

TEXT = ("Machine learning is a field of study in artificial intelligence concerned with the development and study "
        "of statistical algorithms that can learn from data and generalize to unseen data, and thus perform tasks "
        "without explicit instructions. The quick brown fox jumps over the lazy dog. Paris is the capital and "
        "largest city of France.")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"cpu-{os.cpu_count()}core-{mem:.0f}GiB ({platform.processor() or platform.machine()})"


def emit(**row):
    print(json.dumps(row), flush=True)


def try_bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    return bnbf


@torch.no_grad()
def lm_loss(model, ids) -> float:
    return model(ids, labels=ids).loss.item()


@torch.no_grad()
def timed_forward(model, ids, reps=3) -> float:
    model(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        model(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    m, tok = load_base("embedded", dtype="float32", device=dev)
    mach = machine(dev)
    ids = tok([TEXT], return_tensors="pt").input_ids.to(dev)
    linears = {p: mod.weight.detach().clone() for p, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and mod is not m.get_output_embeddings()}

    q = copy.deepcopy(m)
    t = time.perf_counter()
    info = quantize_model(q)
    quant_s = time.perf_counter() - t
    dense32 = info["dense_bytes"]
    emit(case="memory", machine=mach, model="SmolLM2-135M-Instruct", modules=info["modules"],
         linear_fp32_bytes=dense32, linear_bf16_bytes=dense32 // 2, linear_nf4_bytes=info["quant_bytes"],
         bits_per_weight=round(8 * info["quant_bytes"] / (dense32 / 4), 4),
         model_fp32_bytes=weight_bytes(m)["total_bytes"], model_nf4_bytes=weight_bytes(q)["total_bytes"],
         note="embeddings (tied with the head) stay in their dtype; model_* count every tensor once",
         quantize_seconds=round(quant_s, 2))

    bnbf = try_bnb()
    errs, bnb_errs, agree = [], [], []
    for path, w in linears.items():
        mod = q.get_submodule(path)
        ours = mod.weight.dequantize(torch.float32)
        errs.append(((ours - w).norm() / w.norm()).item())
        if bnbf is not None:
            qb, st = bnbf.quantize_4bit(w.cpu().clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
            bnb_errs.append(((bnbf.dequantize_4bit(qb, st).to(dev) - w).norm() / w.norm()).item())
            codes = mod.weight.codes.cpu()[: qb.numel()]
            agree.append((qb.flatten() == codes).float().mean().item())
    row = dict(case="reconstruction", machine=mach, tensors=len(errs), rel_frobenius_mean=sum(errs) / len(errs),
               rel_frobenius_max=max(errs))
    if bnbf is not None:
        row.update(bnb_rel_frobenius_mean=sum(bnb_errs) / len(bnb_errs), bnb_rel_frobenius_max=max(bnb_errs),
                   bnb_code_agreement_min=min(agree))
    emit(**row)

    losses = {"fp32": lm_loss(m, ids), "bf16": lm_loss(copy.deepcopy(m).to(torch.bfloat16), ids),
              "nf4_lorakit": lm_loss(q, ids)}
    if bnbf is not None:
        b = copy.deepcopy(m)
        with torch.no_grad():
            for path, w in linears.items():
                qb, st = bnbf.quantize_4bit(w.cpu().clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
                b.get_submodule(path).weight.data = bnbf.dequantize_4bit(qb, st).to(dev)
        losses["nf4_bitsandbytes_dequantized"] = lm_loss(b, ids)
    with torch.no_grad():
        top1 = (q(ids).logits.argmax(-1) == m(ids).logits.argmax(-1)).float().mean().item()
    emit(case="lm_loss", machine=mach, tokens=ids.shape[1], top1_agreement_nf4_vs_fp32=top1, **losses)

    batch = ids.repeat(4, 1)
    emit(case="forward_seconds", machine=mach, batch=list(batch.shape), threads=torch.get_num_threads(),
         fp32=timed_forward(m, batch), nf4_dequant_on_the_fly=timed_forward(q, batch))
    assert all(isinstance(q.get_submodule(p), NF4Linear) for p in linears)


if __name__ == "__main__":
    main()
