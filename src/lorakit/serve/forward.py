"""The decoder forward the server runs: the model's own modules, a KV cache whose rows the engine controls.

Rows of different lengths live side by side in one cache, each left-aligned (token t of a row at
position t); a decode step writes every row's new key/value at its own length and masks the
positions beyond it. This is what lets a new request join the running batch at the next step
(continuous batching) without padding everyone to the same length.

The layer maths is the model's: embeddings, RMSNorms, rotary embedding, q/k/v/o projections (whose
LoraLinear routing adds each row's adapter), MLP and head are the model's own modules, and attention
is torch's scaled_dot_product_attention as transformers' "sdpa" path calls it, so greedy tokens
match offline generation. Supported: Llama-style decoders (llama, mistral without sliding window, qwen2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.arch import LLAMA_LIKE as SUPPORTED, head_dim


def check_supported(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"the server runs Llama-style decoders ({', '.join(SUPPORTED)}); "
                         f"this model's model_type is {mt!r}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and mt == "mistral":
        raise ValueError(f"sliding-window attention (sliding_window={cfg.sliding_window}) is not supported")
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "q_norm"):
        raise ValueError(f"{mt} attention with q/k norms is not supported by the server's decoder loop")


class RowCache:
    """Per-layer K/V (rows, kv_heads, capacity, head_dim); capacity grows in chunks as rows get longer."""

    def __init__(self, model: nn.Module, max_rows: int, chunk: int = 256):
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        w = next(model.parameters())
        self.dtype, self.device = w.dtype, w.device
        self.max_rows, self.chunk = max_rows, chunk
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cap = 0

    def ensure(self, length: int) -> None:
        """Make room for `length` positions per row (copying what is there)."""
        if length <= self.cap:
            return
        cap = -(-length // self.chunk) * self.chunk
        shape = (self.max_rows, self.kv_heads, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, :self.cap].copy_(old)
        self.k, self.v, self.cap = new_k, new_v, cap

    def zero(self, rows: slice) -> None:
        """Forget what earlier requests left in `rows`: positions a new row masks must hold zeros, not stale
        values (a masked position is multiplied by 0, and 0 x NaN = NaN)."""
        for t in self.k + self.v:
            t[rows].zero_()

    def move(self, src: int, dst: int) -> None:
        """Row `src` takes the place of row `dst` (compaction when a request retires)."""
        for t in self.k + self.v:
            t[dst].copy_(t[src])

    def clear(self) -> None:
        self.k, self.v, self.cap = [], [], 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _attention(attn: nn.Module, q, k, v, mask, causal: bool) -> torch.Tensor:
    """q (b, h, s, d), k/v (b, kvh, t, d), mask (b, 1, 1, t) bool or None -> (b, h, s, d)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None:  # transformers' sdpa path: GQA only without a mask
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling,
                                          enable_gqa=groups > 1)


def _layer(layer: nn.Module, i: int, h: torch.Tensor, cos_sin, cache: RowCache, write, read) -> torch.Tensor:
    """One decoder layer (the model's modules). h (b, s, hidden)."""
    b, s, _ = h.shape
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)  # (b, heads, s, d)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)  # (b, kv_heads, s, d)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos_sin
    q, k = _rotary(q, k, cos, sin)
    write(cache.k[i], cache.v[i], k, v)
    k_all, v_all, mask, causal = read(cache.k[i], cache.v[i], k, v)
    o = _attention(attn, q, k_all, v_all, mask, causal)  # (b, heads, s, d)
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _rotary(q, k, cos, sin):
    from lorakit.arch import apply_rotary as apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _run(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, cache: RowCache, write, read) -> torch.Tensor:
    inner = model.model
    h = inner.embed_tokens(ids)  # (b, s, hidden)
    cos_sin = inner.rotary_emb(h, position_ids=pos)
    for i, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        h = _layer(layer, i, h, cos_sin, cache, write, read)
    return inner.norm(h)


@torch.no_grad()
def prefill(model: nn.Module, cache: RowCache, rows: slice, prompts: list[list[int]]) -> torch.Tensor:
    """Run new prompts into cache rows `rows` (contiguous, empty). Returns last-token logits (n, vocab)."""
    n, width = len(prompts), max(len(p) for p in prompts)
    dev = cache.device
    ids = torch.zeros(n, width, dtype=torch.long)
    for r, p in enumerate(prompts):  # right padding: pads sit after each prompt, causal attention never sees them
        ids[r, : len(p)] = torch.tensor(p)
    ids = ids.to(dev)
    pos = torch.arange(width, device=dev).expand(n, width)
    cache.ensure(width + 1)
    cache.zero(rows)

    def write(K, V, k, v):
        K[rows, :, :width].copy_(k)
        V[rows, :, :width].copy_(v)

    def read(K, V, k, v):
        return k, v, None, width > 1

    h = _run(model, ids, pos, cache, write, read)  # (n, width, hidden)
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return model.lm_head(h[torch.arange(n, device=dev), last][:, None, :])[:, 0].float()  # (n, vocab)


@torch.no_grad()
def extend(model: nn.Module, cache: RowCache, rows: slice, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Append ids (b, c) at positions start..start + c - 1 of cache rows `rows` (b rows that hold `start` tokens
    each: a long prompt or a scored text run a chunk at a time). Returns final-norm hidden states (b, c, hidden)."""
    b, c = ids.shape
    dev, end = cache.device, start + c
    cache.ensure(end + 1)
    pos = torch.arange(start, end, device=dev).expand(b, c)
    # query i (position start + i) sees keys 0..start + i
    mask = (torch.arange(end, device=dev)[None, :] <= torch.arange(start, end, device=dev)[:, None])[None, None]

    def write(K, V, k, v):
        K[rows, :, start:end].copy_(k)
        V[rows, :, start:end].copy_(v)

    def read(K, V, k, v):
        if start == 0:
            return k, v, None, c > 1
        return K[rows, :, :end], V[rows, :, :end], mask, False

    return _run(model, ids.to(dev), pos, cache, write, read)


@torch.no_grad()
def decode(model: nn.Module, cache: RowCache, tokens: list[int], lengths: list[int],
           rows: list[int] | None = None) -> torch.Tensor:
    """One step for cache rows `rows` (default 0..n-1): token i goes to position lengths[i] of row rows[i].
    Returns logits (n, vocab)."""
    n, dev = len(tokens), cache.device
    cache.ensure(max(lengths) + 1)
    ids = torch.tensor(tokens, device=dev)[:, None]  # (n, 1)
    pos_t = torch.tensor(lengths, device=dev)
    leading = rows is None  # rows 0..n-1: slice, no gather
    rows = torch.arange(n, device=dev) if leading else torch.tensor(rows, device=dev)
    width = max(lengths) + 1
    same = min(lengths) == max(lengths)
    mask = None if same else (torch.arange(width, device=dev)[None, :] <= pos_t[:, None])[:, None, None, :]

    def write(K, V, k, v):
        K[rows, :, pos_t] = k[:, :, 0]  # (n, kv_heads, d) at each row's own position
        V[rows, :, pos_t] = v[:, :, 0]

    def read(K, V, k, v):
        if leading:
            return K[:n, :, :width], V[:n, :, :width], mask, False
        return K[rows, :, :width], V[rows, :, :width], mask, False

    h = _run(model, ids, pos_t[:, None], cache, write, read)  # (n, 1, hidden)
    return model.lm_head(h)[:, 0].float()  # (n, vocab)


class _NoCache:
    """The K/V of a forward that keeps nothing (scoring): the layers are handed placeholders they ignore."""

    def __init__(self, n_layers: int):
        self.k = self.v = [None] * n_layers


@torch.no_grad()
def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One causal forward over rows `ids` (b, s) of equal length, no cache: the final-norm hidden states
    (b, s, hidden). The layer maths of prefill and decode, so a row's numbers are those it generates with."""
    b, s = ids.shape
    pos = torch.arange(s, device=ids.device).expand(b, s)

    def write(K, V, k, v):
        pass

    def read(K, V, k, v):
        return k, v, None, s > 1

    return _run(model, ids, pos, _NoCache(model.config.num_hidden_layers), write, read)
