"""What the GPU tests share: the relative error, a NaN-poisoned allocator (an output element a kernel never writes
shows up as NaN), the record of each kernel check's errors (LORAKIT_GPU_TEST_OUT), and the small random Llama the
training tests run (4 layers, width 256, vocab 2048)."""
import json
import os

import torch

VOCAB = 2048


def rel(x, r):
    """||x - r|| / ||r||, in float64."""
    return float((x.double() - r.double()).norm() / r.double().norm())


def poison(n_bytes: int):
    """Fill free allocator blocks with NaN so unwritten outputs show up as NaN."""
    buf = torch.full((n_bytes // 4,), float("nan"), device="cuda")
    del buf


def record(name, errs):
    out = os.environ.get("LORAKIT_GPU_TEST_OUT")
    if out:
        with open(os.path.join(out, f"kernel_check_{name}.json"), "w") as fh:
            json.dump(errs, fh)


def small_llama_config(**extra):
    """The GPU training tests' Llama: big enough for the fused paths' shapes, small enough to train 50 steps fast."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, **extra)
