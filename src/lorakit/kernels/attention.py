"""Attention as transformers computes it, and decode attention over a static KV cache behind one dispatch point
(the Triton kernel on CUDA).

    dense_attention(q, k, v, scale, mask, causal, softcap) -> (b, heads, s, d)
    decode_attention(q, K, V, rows, lengths, scale, window, softcap) -> (b, heads, d)

dense_attention is the maths of transformers' attention functions: torch's scaled_dot_product_attention as its
"sdpa" path calls it (GQA by repeating K/V where a mask is given), and its eager maths where the scores are
soft-capped (scores = cap * tanh(scores / cap), then the mask, softmax in float32; sdpa cannot express the cap).

decode_attention: q (b, heads, d) holds one query token per row; K and V (cache_rows, kv_heads, capacity, d) are
one layer's cache; query i sits at position lengths[i] - 1 of cache row rows[i] (lengths >= 1) and attends to the
positions p of that row with lengths[i] - window <= p < lengths[i] (window None: from 0), transformers' sliding
window (key p is seen from position q when p > q - window). heads is a multiple of kv_heads (grouped-query
attention: head h reads kv head h // (heads / kv_heads)). The reference below is dense_attention over the gathered
rows with that mask, so the plain path's numbers are the offline model's.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def causal_mask(q_pos: torch.Tensor, width: int, window: int | None = None) -> torch.Tensor:
    """(b, 1, s, width) bool: key j is seen by the query at position q_pos (b, s) when q_pos - window < j <= q_pos
    (window None: 0 <= j <= q_pos), transformers' causal and sliding-window masks."""
    j = torch.arange(width, device=q_pos.device)
    seen = j <= q_pos[..., None]  # (b, s, width)
    if window is not None:
        seen = seen & (j > q_pos[..., None] - window)
    return seen[:, None]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                    causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """q (b, h, s, d), k/v (b, kvh, t, d), mask (b or 1, 1, s or 1, t) bool (True: attend) or None; causal: the
    lower triangle where no mask is given. -> (b, h, s, d)."""
    groups = q.shape[1] // k.shape[1]
    if softcap is not None:  # transformers' eager maths: cap the scores, then mask, softmax in float32
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.tanh(q @ k.transpose(2, 3) * scale / softcap) * softcap  # (b, h, s, t)
        if mask is None and causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    if groups > 1 and mask is not None:  # transformers' sdpa path: GQA only without a mask
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=groups > 1)


def reference(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
              scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    width = int(lengths.max())  # a host sync: the plain path only
    k, v = K[rows, :, :width], V[rows, :, :width]  # (b, kvh, width, d)
    mask = causal_mask((lengths - 1)[:, None], width, window)  # (b, 1, 1, width)
    return dense_attention(q[:, :, None], k, v, scale, mask, softcap=softcap)[:, :, 0]


def _triton(q, K, V, rows, lengths, scale, window, softcap):
    from lorakit.kernels import triton_attn

    return triton_attn.decode_attention(q, K, V, rows, lengths, scale, window=window, softcap=softcap)


def decode_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                     scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return _triton(q, K, V, rows, lengths, scale, window, softcap)
    return reference(q, K, V, rows, lengths, scale, window, softcap)
