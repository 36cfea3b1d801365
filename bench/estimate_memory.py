"""`lorakit estimate`'s predicted peak training memory vs the measured peak of real training steps.

Each case trains 2 steps of lorakit's loop on random tokens, in its own subprocess, with a randomly
initialised model built from config fields (no weights are read), and prints one JSON line:
  the case, predicted_mib, measured_mib (base weights + the rise of the peak over the memory at the start of
  training: CUDA's allocator peak on a GPU, VmHWM on the CPU), and error = measured / predicted - 1.
Run: python bench/estimate_memory.py --device cuda --machine "H100 80GB HBM3" > bench/results/estimate_memory_h100.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform

from transformers import AutoConfig

from lorakit.lab.estimate import arch_of, estimate, measure

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    tie_word_embeddings=True)
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
MID = dict(model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)

GPU_CASES = [  # (name, config, method, targets, r, batch, seq, dtype, checkpointing)
    ("smollm2-135m", SMOLLM2_135M, "lora", "all-linear", 16, 8, 512, "bfloat16", False),
    ("smollm2-135m", SMOLLM2_135M, "lora", "attn", 16, 8, 512, "bfloat16", False),
    ("smollm2-135m", SMOLLM2_135M, "full", "all-linear", 16, 8, 512, "bfloat16", False),
    ("smollm2-135m", SMOLLM2_135M, "full", "all-linear", 16, 8, 512, "float32", False),
    ("llama-1b-shape", LLAMA_1B, "lora", "all-linear", 16, 4, 1024, "bfloat16", False),
    ("llama-1b-shape", LLAMA_1B, "lora", "all-linear", 16, 4, 1024, "bfloat16", True),
    ("llama-1b-shape", LLAMA_1B, "lora", "attn", 64, 4, 1024, "bfloat16", False),
    ("llama-1b-shape", LLAMA_1B, "full", "all-linear", 16, 4, 1024, "bfloat16", False),
    ("llama-1b-shape", LLAMA_1B, "full", "all-linear", 16, 4, 1024, "bfloat16", True),
    ("llama-1b-shape", LLAMA_1B, "lora", "all-linear", 16, 16, 2048, "bfloat16", True),
]
CPU_CASES = [
    ("mid-7m", MID, "lora", "all-linear", 16, 8, 128, "float32", False),
    ("mid-7m", MID, "lora", "attn", 16, 8, 128, "float32", False),
    ("mid-7m", MID, "full", "all-linear", 16, 8, 128, "float32", False),
    ("mid-7m", MID, "lora", "all-linear", 16, 8, 128, "float32", True),
    ("smollm2-135m", SMOLLM2_135M, "lora", "all-linear", 16, 4, 128, "float32", False),
    ("smollm2-135m", SMOLLM2_135M, "full", "all-linear", 16, 4, 128, "float32", False),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--machine", default=f"{platform.machine()} cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cases = GPU_CASES if args.device.startswith("cuda") else CPU_CASES
    for name, cfg, method, targets, r, batch, seq, dtype, ck in cases:
        arch = arch_of(AutoConfig.for_model(**cfg), name)
        pred = estimate(arch, method, r, batch, seq, targets, dtype, ck)
        got = measure(cfg, method, r, batch, seq, targets, device=args.device, dtype=dtype, checkpointing=ck,
                      threads=args.threads)
        assert got["trainable"] == pred.trainable, (got["trainable"], pred.trainable)
        predicted = pred.total / 2 ** 20
        print(json.dumps({"machine": args.machine, "device": args.device, "model": name, "params": arch.params,
                          "method": method, "targets": targets, "r": r, "batch": batch, "seq": seq, "dtype": dtype,
                          "checkpointing": ck, "trainable": pred.trainable,
                          "predicted_mib": round(predicted, 1), "measured_mib": round(got["measured_mib"], 1),
                          "error": round(got["measured_mib"] / predicted - 1, 4),
                          "parts_mib": {k: round(v / 2 ** 20, 1) for k, v in pred.to_dict().items()
                                        if k in ("weights", "grads", "optimizer", "activations", "logits")}}),
              flush=True)


if __name__ == "__main__":
    main()
