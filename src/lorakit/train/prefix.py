"""Shared-prefix forward: the tokens every row of a micro-batch starts with are computed once.

Chat rows share a long head: the template's system prompt and, for a task, the instruction (65 of 90 tokens on
data/classify, 53 of 81 on data/demo). The plain forward computes it once per row. Here the body runs once on
the shared prefix (one row) with a key/value cache, the cache is broadcast to every row, and the body runs on
the rows' remaining tokens with the whole attention mask. The hidden states of the rows' tokens are the same
as the plain forward's (the same attention over the same keys, the same rotary positions), and so are the
gradients: the prefix's keys and values are used by every row, so their gradient is the sum over the rows,
exactly what the plain forward sums over its copies. Only the work differs: 65 + 8 x 25 token-passes instead
of 8 x 90 for a batch of 8 classification rows. Packed rows (`packed_body`) need no cache: the prefix and the
rows' own tokens run in one call, each row attending to the prefix and to itself.

Where it applies: the plain backend, a Llama-family body with a plain head (arch.body_and_head), no
recompute (Hugging Face checkpointing drops the cache), no sliding window, one process (DDP/FSDP keep the
plain forward), and a shared prefix of at least MIN_PREFIX tokens that predicts no target. LoRA dropout, if
any, draws one mask for the prefix that every row shares (each row's expected loss is unchanged).
"""
from __future__ import annotations

import torch

from lorakit import arch
from lorakit.train.data import IGNORE

MIN_PREFIX = 16  # below this the second call costs more than it saves


def prefix_supported(model) -> str | None:
    """Why the shared-prefix forward cannot run on this model, or None if it can."""
    kind = arch.model_type(model)
    if kind not in arch.LLAMA_LIKE:
        return f"model type {kind!r} is not a Llama-family decoder"
    if arch.body_and_head(model) is None:
        return "the head is not a plain projection of the last hidden state"
    window = next((w for w in arch.windows(model) if w), None)
    if window:
        return f"the model uses sliding-window attention ({window})"
    return None


def shared_prefix_len(batch: dict[str, torch.Tensor], min_len: int = MIN_PREFIX) -> int:
    """How many leading tokens every row shares and may be computed once: no padding in them, no hidden state
    in them that predicts a target, and at least one own token left in every row. 0 when below `min_len`."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]).all(0) & (mask == 1).all(0)).long()
    p = int(same.cumprod(0).sum())
    predicts = (labels[:, 1:] != IGNORE).any(0).nonzero()           # positions whose hidden state is scored
    if predicts.numel():
        p = min(p, int(predicts[0]))
    p = min(p, int(mask.sum(1).min()) - 1)
    return p if p >= min_len else 0


def _broadcast(cache, rows: int) -> None:
    """Every layer's prefix keys/values seen by `rows` rows (a view where the cache allows it)."""
    layers = getattr(cache, "layers", None)
    if layers and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        for layer in layers:
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    else:
        cache.batch_repeat_interleave(rows)


def body_with_prefix(body, batch: dict[str, torch.Tensor], p: int) -> torch.Tensor:
    """The body's last hidden state at positions p.. of every row, with positions ..p computed once: (b, s-p, d)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    arg = arch.cache_keyword(type(body))
    head = body(input_ids=ids[:1, :p], attention_mask=mask[:1, :p], use_cache=True)
    cache = getattr(head, arg)
    _broadcast(cache, ids.shape[0])
    return body(input_ids=ids[:, p:], attention_mask=mask, use_cache=True, **{arg: cache}).last_hidden_state


# ---------------------------------------------------------------- packed rows (train/packed_attention.py)
def packed_prefix_len(batch: dict, min_len: int = MIN_PREFIX) -> int:
    """shared_prefix_len for packed rows (data.pack): leading tokens every row (segment) shares, none of whose
    hidden states predicts a target, at least one own token left per row; 0 when below `min_len`."""
    lens = batch["seq_lens"]
    if len(lens) < 2:
        return 0
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    p = min(lens) - 1
    first = ids[starts[0]:starts[0] + p]
    for a in starts[1:]:
        same = (ids[a:a + p] == first[:p]).long()
        p = min(p, int(same.cumprod(0).sum()))
    for a, n in zip(starts, lens):
        scored = (labels[a + 1:a + n] != IGNORE).nonzero()                # hidden state j predicts label j + 1
        if scored.numel():
            p = min(p, int(scored[0]))
    return p if p >= min_len else 0


def packed_body(body, batch: dict, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The body on packed rows, attention within each row (train/packed_attention.py), the first p tokens of
    the rows computed once when p > 0 -> (hidden (1, s', d), labels (1, s')) at the positions run per row."""
    ids, labels, pos, lens = batch["input_ids"], batch["labels"], batch["position_ids"], batch["seq_lens"]
    if not p:
        hidden = body(input_ids=ids, position_ids=pos, use_cache=False, row_lens=tuple(lens)).last_hidden_state
        return hidden, labels
    keep = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)   # each row's own tokens
    at = 0
    for n in lens:
        keep[at:at + p] = False
        at += n
    run = keep.clone()
    run[:p] = True  # one call: the prefix once (the first row's copy), then every row's own tokens
    hidden = body(input_ids=ids[:, run], position_ids=pos[:, run], use_cache=False, prefix_len=p,
                  row_lens=tuple(n - p for n in lens)).last_hidden_state
    return hidden[:, p:], labels[:, keep]
