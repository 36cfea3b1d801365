"""Predict QLoRA's peak device memory on the CPU, without a GPU: the llama-8b training step of bench/qlora_peak.py
(NF4 base, LoRA r=16 on every linear, fp32 adapter masters, AdamW, Hugging Face checkpointing on every layer,
the loop's loss, batch 1 x 2048) run on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data) under
a dispatch mode that counts the bytes of every storage alive (rounded up to the CUDA allocator's 512 bytes), from
the model's creation on. Two steps, each phase's end and peak as bench/qlora_peak.py records them on the device;
allocated memory only (the allocator's reserved memory and fragmentation are not modelled).

Variants, each adding one change to the previous (the order of issue 24's plan):
  r4        round 4's set-up as measured on the H200 (bench/results/qlora_peak_h200_2026-11-29.jsonl: 7.72 GiB):
            lorakit's own plain-torch dequantization, LoRA through the general layer (fp32 adapters cast x up),
            plain-torch loss chunks of 512 positions, the embedding on the device
  bnb       + bitsandbytes' dequantization (its fake kernel: the dequantized weight and nothing else)
  fused     + QLoRA's single autograd step (core/qlora.py)
  ce        + the in-place loss kernel in chunks of 256 (its memory: the bf16 logits chunk, reused for the gradient)
  host-emb  + the input embedding in host memory (only the batch's rows on the device)

    PYTHONPATH=src:<bitsandbytes> python bench/qlora_peak_predict.py [--shape llama-8b] [--seq 2048] [--out FILE]

It runs on the CPU: CPU kernels stand in for CUDA ones where they differ (attention: the CPU flash kernel keeps
the output and log-sum-exp, as CUDA's do). The r4 row checks the method against the device's measured 7.72 GiB.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # noqa: E402  (SHAPES)

GIB = 2 ** 30
VARIANTS = ("r4", "bnb", "fused", "ce", "host-emb")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive (each counted once, however many views), their peak since `reset_peak`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self.live:
                    n = -(-st.nbytes() // 512) * 512
                    self.live[id(st)] = n
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, id(st))
        return out


class _RowsArrive(nn.Module):
    """The device side of train/offload.py's HostEmbedding: the batch's rows appear; no table on the device."""

    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.d, self.dtype = d, dtype

    def forward(self, ids):
        return torch.empty(*ids.shape, self.d, dtype=self.dtype)


def _inplace_ce(logits, targets, inv_n, ignore_index):
    """Memory of kernels/triton_ce.py: a scalar loss, the gradient written over the logits chunk."""
    return logits.sum(dtype=torch.float32) * inv_n, logits


def _target_hidden_all(model, batch, share_prefix=False):
    """backends.target_hidden for a batch whose every position is a target: the same copy of (n, d), without the
    boolean mask's data-dependent size (fake tensors have no data)."""
    from lorakit.arch import body_and_head

    body, head = body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), head, batch["labels"][:, 1:].reshape(-1)


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = gpu_train.SHAPES[shape]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=8192, tie_word_embeddings=s["tie"], attn_implementation="sdpa",
                      use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    return model  # on the meta device: to_empty() inside the fake mode gives fake tensors


def predict(shape: str, seq: int, upto: str) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorakit import LoraConfig, add_adapter
    from lorakit.core.layer import LoraLinear
    from lorakit.core.nf4 import LoraNF4Linear, NF4Weight, _byte_table, dynamic_map, quantize_model
    from lorakit.train import backends

    on = set(VARIANTS[:VARIANTS.index(upto) + 1])
    saved = (LoraNF4Linear.forward, backends._inplace_chunk_fn, backends.target_hidden)
    backends.target_hidden = _target_hidden_all
    if "fused" not in on:
        LoraNF4Linear.forward = LoraLinear.forward
    if "ce" in on:
        backends._inplace_chunk_fn = lambda h: _inplace_ce
    meta = build(shape)
    dynamic_map("cpu"), _byte_table(torch.device("cpu"))  # real code books, made before the fake mode (cached)
    if "bnb" in on:  # bitsandbytes' code books too (its dynamic map reads values back: no fake tensor can)
        from lorakit.kernels import nf4_lib
        nf4_lib.bnb_state(*(torch.zeros(1),) * 3, (1, 64), torch.bfloat16)
    mem = LiveBytes()
    gib = lambda b: round(b / GIB, 3)  # noqa: E731
    steps = []
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), mem:
            model = meta.to_empty(device="cpu")
            quantize_model(model, "all-linear", lib="own")  # the same state whichever library dequantizes
            for m in model.modules():
                if isinstance(m, NF4Weight):
                    m.lib = "bnb" if "bnb" in on else "own"
            if "host-emb" in on:
                model.set_input_embeddings(_RowsArrive(model.config.hidden_size, torch.bfloat16))
            add_adapter(model, LoraConfig(r=16, alpha=32, dropout=0.0, targets="all-linear"))
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # the loop's fp32 masters
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
            ids = torch.zeros(1, seq, dtype=torch.long)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            static = mem.now
            for _ in range(2):
                phases = {}
                mem.reset_peak()
                loss, _ = backends.causal_lm_loss(model, batch)
                phases["forward"] = {"after_gib": gib(mem.now), "peak_gib": gib(mem.peak)}
                mem.reset_peak()
                loss.backward()
                del loss
                phases["backward"] = {"after_gib": gib(mem.now), "peak_gib": gib(mem.peak)}
                mem.reset_peak()
                opt.step()
                opt.zero_grad(set_to_none=True)
                phases["optimizer"] = {"after_gib": gib(mem.now), "peak_gib": gib(mem.peak)}
                steps.append(phases)
    finally:
        LoraNF4Linear.forward, backends._inplace_chunk_fn, backends.target_hidden = saved
    peak = max(ph["peak_gib"] for st in steps for ph in st.values())
    return {"variant": upto, "static_gib": gib(static), "peak_gib": peak, "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out")
    args = ap.parse_args()
    import transformers

    for v in args.variants:
        t0 = time.time()
        rec = {"bench": "qlora_peak_predict", "shape": args.shape, "seq": args.seq, "batch": 1,
               "device": "fake tensors on cpu (predicted, not measured)", "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), **predict(args.shape, args.seq, v)}
        rec["wall_s"] = round(time.time() - t0, 1)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
