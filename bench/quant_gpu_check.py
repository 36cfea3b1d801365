"""QLoRA on a GPU: the same NF4 code as on CPU, checked and measured on CUDA.

    PYTHONPATH=src python bench/quant_gpu_check.py > bench/results/quant_gpu-<gpu>.jsonl

1. codes: quantizing on CUDA gives the same bytes as on CPU; 4-bit logits on CUDA match CPU's.
2. QLoRA training in bf16 on CUDA: loss falls.
3. Memory and speed on a random 1.1B Llama (bf16): bytes of the weights, dense vs NF4, and the peak memory
   and time of a LoRA training step, dense bf16 base vs 4-bit base, side by side.
One JSON line per case.
"""
from __future__ import annotations

import json
import time

import torch

from lorakit import LoraConfig, add_adapter
from lorakit.models import tiny_llama
from lorakit.core.nf4 import quantize_model, quantize_nf4, weight_bytes


def emit(**row):
    print(json.dumps({"machine": torch.cuda.get_device_name(), **row}), flush=True)


def check_codes():
    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.02
    cpu, gpu = quantize_nf4(w), quantize_nf4(w.cuda())
    same = all(torch.equal(cpu[k], gpu[k].cpu()) for k in ("codes", "absmax_q"))
    scale_gap = (cpu["absmax_scale"] - gpu["absmax_scale"].cpu()).abs().max().item()
    ids = torch.randint(3, 128, (2, 16))
    m_cpu, m_gpu = tiny_llama(), tiny_llama().cuda()
    quantize_model(m_cpu)
    quantize_model(m_gpu)
    with torch.no_grad():
        a, b = m_cpu(ids).logits, m_gpu(ids.cuda()).logits.cpu()
    emit(case="cpu_vs_cuda", codes_identical=same, absmax_scale_max_gap=scale_gap,
         logits_max_abs_diff=(a - b).abs().max().item(), logits_max_abs=a.abs().max().item())


def check_training():
    torch.manual_seed(0)
    m = tiny_llama(dtype=torch.bfloat16).cuda()
    quantize_model(m)
    add_adapter(m, LoraConfig(r=8, alpha=16, targets="all-linear"))
    ids = torch.randint(3, 128, (4, 32), device="cuda")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    emit(case="qlora_bf16_training", steps=40, loss_first=losses[0], loss_last=losses[-1])


def big_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def train_step_stats(m, ids, steps=3):
    add_adapter(m, LoraConfig(r=16, alpha=32, targets="all-linear"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return torch.cuda.max_memory_allocated(), min(times[1:])


def check_memory():
    ids = torch.randint(0, 32000, (4, 512), device="cuda")
    rows = {}
    for label in ("dense_bf16", "nf4"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        m = big_llama()
        info = quantize_model(m) if label == "nf4" else None
        torch.cuda.synchronize()
        rows[label] = {"weights_allocated_bytes": torch.cuda.memory_allocated() - before,
                       "tensor_bytes": weight_bytes(m)}
        if info:
            rows[label]["linear_dense_bytes"], rows[label]["linear_nf4_bytes"] = info["dense_bytes"], info["quant_bytes"]
        peak, step_s = train_step_stats(m, ids)
        rows[label] |= {"train_step_peak_bytes": peak - before, "train_step_seconds": step_s}
        del m
        torch.cuda.empty_cache()
    emit(case="memory_1.1B_llama_bf16", batch=list(ids.shape), lora="r=16 all-linear", **rows)


if __name__ == "__main__":
    check_codes()
    check_training()
    check_memory()
