"""The decoder forward the server runs: the model's own modules, a KV cache whose rows the engine controls.

Rows of different lengths live side by side in one cache, each left-aligned (token t of a row at
position t); a decode step writes every row's new key/value at its own length and masks the
positions beyond it. This is what lets a new request join the running batch at the next step
(continuous batching) without padding everyone to the same length.

The layer maths is the model's, read from its description (lorakit.arch): the embedding, norms, rotary tables,
projections (whose LoraLinear routing adds each row's adapter; a fused qkv projection is split after it), q/k norms,
MLP and head are the model's own modules; attention is kernels.attention.dense_attention: torch's
scaled_dot_product_attention as transformers' "sdpa" path calls it, or the eager maths where scores are soft-capped
(Gemma 2), so greedy tokens match offline generation. Sliding-window layers mask keys more than `window - 1`
positions back (the cache keeps them all).
Served: the model types arch.SUPPORTED (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lorakit import arch
from lorakit.kernels.attention import causal_mask, dense_attention

# RoPE whose frequencies depend on what the module computed before (transformers' "dynamic" updates them in
# place as longer sequences pass): a batch of rows cannot reproduce each row's offline numbers
STATEFUL_ROPE = ("dynamic",)


def check_supported(model: nn.Module) -> None:
    """Refuse (ValueError naming the model type or setting, and what is served) a model this forward does not
    compute exactly."""
    arch.family(model, "the server")
    cfg = model.config
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError(f"{cfg.model_type} with use_bidirectional_attention=True is an encoder; the server "
                         "generates with causal attention")
    kind = arch.rope_type(model)
    if kind in STATEFUL_ROPE:
        raise ValueError(f"RoPE scaling {kind!r} is not served (its frequencies depend on earlier calls); "
                         "use a static scaling (linear, llama3, yarn, longrope)")


class RowCache:
    """Per-layer K/V (rows, kv_heads, capacity, head_dim); capacity grows in chunks as rows get longer."""

    def __init__(self, model: nn.Module, max_rows: int, chunk: int = 256):
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = arch.head_dim(cfg)
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


class Model:
    """What one forward needs of the model, read from arch once per call: family, parts, windows, soft-caps."""

    def __init__(self, model: nn.Module):
        self.model, self.fam = model, arch.family(model, "the server")
        self.layers = [arch.layer_parts(layer) for layer in arch.decoder_layers(model)]
        self.layers = self.layers[:model.config.num_hidden_layers]
        self.windows = arch.windows(model)
        self.softcap = arch.attn_softcap(model)
        self.sizes = arch.qkv_sizes(model.config)


def _layer(m: Model, i: int, h: torch.Tensor, cos_sin, cache: RowCache, write, read) -> torch.Tensor:
    """One decoder layer (the model's modules). h (b, s, hidden)."""
    b, s, _ = h.shape
    p = m.layers[i]
    q, k, v = arch.project_qkv(m.fam, p.attn, p.input_norm(h), m.sizes)  # (b, s, heads or kv_heads, d)
    if p.q_norm is not None:
        q, k = p.q_norm(q), p.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, s, d)
    q, k = arch.apply_rotary(q, k, *cos_sin)
    write(cache.k[i], cache.v[i], k, v)
    k_all, v_all, mask, causal = read(cache.k[i], cache.v[i], k, v, m.windows[i])
    o = dense_attention(q, k_all, v_all, p.attn.scaling, mask, causal, m.softcap)  # (b, heads, s, d)
    o = p.attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
    h = h + (o if p.post_attn is None else p.post_attn(o))
    o = p.mlp(p.pre_mlp(h))
    return h + (o if p.post_mlp is None else p.post_mlp(o))


def _run(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, cache: RowCache, write, read,
         lengths: list[int] | None = None, seq_lens: list[int] | None = None) -> torch.Tensor:
    """Final-norm hidden states (b, s, hidden) of tokens ids (b, s) at positions pos (b, s); `lengths`: each row's
    real tokens (the rest is padding) and `seq_lens`, for RoPE whose tables depend on a sequence's length
    (arch.rotary)."""
    m = Model(model)
    h = arch.embed(model)(ids)  # (b, s, hidden)
    tables = arch.rotary(model, h, pos, lengths, seq_lens)
    for i in range(len(m.layers)):
        h = _layer(m, i, h, tables[i], cache, write, read)
    return arch.final_norm(model)(h)


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

    masks = {}

    def read(K, V, k, v, window):
        if window is None or window >= width:
            return k, v, None, width > 1
        if window not in masks:
            masks[window] = causal_mask(pos[:1], width, window)  # (1, 1, width, width)
        return k, v, masks[window], False

    h = _run(model, ids, pos, cache, write, read, [len(p) for p in prompts])  # (n, width, hidden)
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return arch.logits(model, h[torch.arange(n, device=dev), last][:, None, :])[:, 0].float()  # (n, vocab)


@torch.no_grad()
def extend(model: nn.Module, cache: RowCache, rows: slice, ids: torch.Tensor, start: int,
           total: int | None = None) -> torch.Tensor:
    """Append ids (b, c) at positions start..start + c - 1 of cache rows `rows` (b rows that hold `start` tokens
    each: a long prompt or a scored text run a chunk at a time). total: the whole prompt's or text's length, which
    RoPE tables that depend on a sequence's length are chosen by (as offline, in one forward). Returns final-norm
    hidden states (b, c, hidden)."""
    b, c = ids.shape
    dev, end = cache.device, start + c
    cache.ensure(end + 1)
    pos = torch.arange(start, end, device=dev).expand(b, c)
    masks = {}

    def write(K, V, k, v):
        K[rows, :, start:end].copy_(k)
        V[rows, :, start:end].copy_(v)

    def read(K, V, k, v, window):
        if window is not None and window >= end:
            window = None
        if start == 0 and window is None:
            return k, v, None, c > 1
        if window not in masks:  # query i (position start + i) sees keys start + i - window + 1 .. start + i
            masks[window] = causal_mask(pos[:1], end, window)  # (1, 1, c, end)
        return K[rows, :, :end], V[rows, :, :end], masks[window], False

    return _run(model, ids.to(dev), pos, cache, write, read, [c] * b, None if total is None else [total] * b)


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
    masks = {}

    def write(K, V, k, v):
        K[rows, :, pos_t] = k[:, :, 0]  # (n, kv_heads, d) at each row's own position
        V[rows, :, pos_t] = v[:, :, 0]

    def read(K, V, k, v, window):
        if window is not None and window >= width:
            window = None
        if window not in masks:
            masks[window] = None if same and window is None else causal_mask(pos_t[:, None], width, window)
        if leading:
            return K[:n, :, :width], V[:n, :, :width], masks[window], False
        return K[rows, :, :width], V[rows, :, :width], masks[window], False

    h = _run(model, ids, pos_t[:, None], cache, write, read, [1] * n)  # (n, 1, hidden)
    return arch.logits(model, h)[:, 0].float()  # (n, vocab)


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
    masks = {}

    def write(K, V, k, v):
        pass

    def read(K, V, k, v, window):
        if window is None or window >= s:
            return k, v, None, s > 1
        if window not in masks:
            masks[window] = causal_mask(pos[:1], s, window)
        return k, v, masks[window], False

    return _run(model, ids, pos, _NoCache(model.config.num_hidden_layers), write, read, [s] * b)
