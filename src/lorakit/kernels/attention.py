"""Decode attention over a static KV cache, behind one dispatch point (the Triton kernel on CUDA).

    decode_attention(q, K, V, rows, lengths, scale) -> (b, heads, d)

q (b, heads, d) holds one query token per row; K and V (cache_rows, kv_heads, capacity, d) are one layer's
cache; query i attends to positions 0 .. lengths[i] - 1 of cache row rows[i] (lengths >= 1). heads is a multiple
of kv_heads (grouped-query attention: head h reads kv head h // (heads / kv_heads)). The reference below is
torch's scaled_dot_product_attention over the gathered rows with a length mask, the op transformers' "sdpa"
attention runs, so the plain path's numbers are the offline model's.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def reference(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
              scale: float) -> torch.Tensor:
    width = int(lengths.max())  # a host sync: the plain path only
    k, v = K[rows, :, :width], V[rows, :, :width]  # (b, kvh, width, d)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = (torch.arange(width, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]


def _triton(q, K, V, rows, lengths, scale):
    from lorakit.kernels import triton_attn

    return triton_attn.decode_attention(q, K, V, rows, lengths, scale)


def decode_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return _triton(q, K, V, rows, lengths, scale)
    return reference(q, K, V, rows, lengths, scale)
