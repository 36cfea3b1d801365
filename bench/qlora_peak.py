"""Where QLoRA's GPU memory goes: the llama-8b shape with lorakit's NF4 base, LoRA r=16 on every linear, the
training loop's set-up (fp32 adapter masters, AdamW, Hugging Face checkpointing on every layer, the loss on
target positions with chunked cross-entropy), batch 1 x 2048. One JSON line: the static parts (NF4 buffers,
bf16 weights left dense, adapters) and the allocated memory after and at the peak of each phase of two steps.

    PYTHONPATH=src python bench/qlora_peak.py [--shape llama-8b] [--seq 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # noqa: E402

GIB = 2 ** 30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk-above", type=int, default=0,
                    help="log2 of train.backends.CHUNK_ABOVE (the loss's chunk size follows it); 0: as shipped")
    ap.add_argument("--out")
    args = ap.parse_args()
    from lorakit.train import backends
    if args.chunk_above:
        backends.CHUNK_ABOVE = 1 << args.chunk_above
    from lorakit import LoraConfig, add_adapter
    from lorakit.core.nf4 import NF4Weight, quantize_model
    from lorakit.train.backends import causal_lm_loss

    model = gpu_train.build(args.shape)
    quantize_model(model, "all-linear")
    torch.cuda.empty_cache()
    add_adapter(model, LoraConfig(r=16, alpha=32, dropout=0.0, targets="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the loop's fp32 masters
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Weight) for b in m.buffers())
    dense = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad}
    rec = {"bench": "qlora_peak", "shape": args.shape, "seq": args.seq, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "chunk_above_log2": backends.CHUNK_ABOVE.bit_length() - 1,
           "nf4_gib": nf4 / GIB, "dense_frozen_gib": sum(dense.values()) / GIB,
           "dense_frozen_largest": sorted(((v / GIB, k) for k, v in dense.items()), reverse=True)[:3],
           "adapter_fp32_gib": sum(p.numel() * 4 for p in params) / GIB,
           "static_gib": torch.cuda.memory_allocated() / GIB, "steps": []}
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for step in range(2):
        phases = {}
        torch.cuda.reset_peak_memory_stats()
        loss, _ = causal_lm_loss(model, batch)
        torch.cuda.synchronize()
        phases["forward"] = (torch.cuda.memory_allocated() / GIB, torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        phases["backward"] = (torch.cuda.memory_allocated() / GIB, torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        phases["optimizer"] = (torch.cuda.memory_allocated() / GIB, torch.cuda.max_memory_allocated() / GIB)
        rec["steps"].append({"loss": float(loss), **{k: {"after_gib": round(a, 3), "peak_gib": round(b, 3)}
                                                     for k, (a, b) in phases.items()}})
    rec["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
