"""What the server tests share: a tiny base model saved with the embedded model's tokenizer, adapters with
non-trivial B saved from it, and a way to start requests together so that they share forward passes."""
import threading
import time

import torch
from transformers import AutoTokenizer

from lorakit import add_adapter, delete_adapter, save_adapter
from lorakit.models import embedded_dir, tiny_llama


def tiny_base(root, max_positions: int = 256, **shape):
    """A random tiny Llama with the embedded model's tokenizer (its chat template too), saved at root/'base'."""
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    tiny = tiny_llama(vocab_size=49152, **shape)
    tiny.config.max_position_embeddings = max_positions
    tiny.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def save_noisy_adapter(model, path, cfg, seed):
    """An adapter of `cfg` whose every trainable tensor is scaled up (so it visibly changes the output)."""
    torch.manual_seed(seed)
    add_adapter(model, cfg, "x")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    save_adapter(model, path, "x")
    delete_adapter(model, "x")


def together(env, fns):
    """Run fns concurrently, holding the engine until all have queued: they must share forward passes.
    -> (their results, the most rows the engine decoded at once)."""
    eng = env["state"].engine
    gate = threading.Event()
    eng.call(gate.wait)
    eng.stats["max_rows"] = 0
    out = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i, f=f: out.__setitem__(i, f())) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(eng.waiting) < len(fns) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    return out, eng.stats["max_rows"]
