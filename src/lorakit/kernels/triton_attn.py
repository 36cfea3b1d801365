"""Triton decode attention over a static KV cache: one query token per row, rows of different lengths, GQA, a
sliding window and soft-capped scores.

    q (b, heads, d)   K, V (rows, kv_heads, capacity, d)   rows (b,) cache row of each query
    lengths (b,)      valid positions of each row (the new token's included; at least 1)
    window            the row's last `window` positions only (None: all); softcap: scores = c * tanh(scores / c)

Flash-decoding in two launches: `_split` gives each (query row, kv head, chunk of positions) program the
heads that share that kv head, reads only the row's attended positions of its chunk (block by block, online
softmax in fp32) and writes an unnormalised partial output with its running max and sum; `_combine` merges
a head's partials. The grid depends on shapes only and nothing syncs with the host, so the call is captured
in a CUDA graph. A row's chunks start at its window's first position (0 without a window), so a layer with a
window splits only the window's positions; a chunk that lies past a row's length reads nothing. The contract and
the plain-torch reference are in kernels/attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp (absolute error ~ fp32 epsilon), for Triton builds without a tanh of their own."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _split(q_ptr, k_ptr, v_ptr, rows_ptr, len_ptr, o_ptr, ml_ptr, scale, W, cap, B, H, G, D,
           sq_b, sq_h, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l,
           CHUNK: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
           SOFTCAP: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    row = tl.load(rows_ptr + b).to(tl.int64)
    n = tl.load(len_ptr + b)
    start = tl.maximum(n - W, 0) + sp * CHUNK  # chunks cover the row's window (its first n - W positions unread)
    end = tl.minimum(n, start + CHUNK)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gm = g < G
    dm = d < D
    heads = kh * G + g
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    kb = k_ptr + row * sk_r + kh * sk_h
    vb = v_ptr + row * sv_r + kh * sv_h
    for i in range(0, CHUNK, BN):
        s0 = start + i
        if s0 < end:
            pos = s0 + tl.arange(0, BN)
            pm = pos < end
            k = tl.load(kb + pos[:, None].to(tl.int64) * sk_l + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            # scores in fp32 whoever launches (torch.compile passes the Python floats scale and cap as fp64)
            s = (tl.dot(q, tl.trans(k), input_precision=PREC) * scale).to(tl.float32)  # (GP, BN)
            if SOFTCAP:
                s = (cap * _tanh(s / cap)).to(tl.float32)
            s = tl.where(pm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vb + pos[:, None].to(tl.int64) * sv_l + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    base = (sp * B + b).to(tl.int64) * H + heads  # (GP,)
    tl.store(o_ptr + base[:, None] * DP + d[None, :], acc, mask=gm[:, None])
    tl.store(ml_ptr + base * 2, m_i, mask=gm)
    tl.store(ml_ptr + base * 2 + 1, l_i, mask=gm)


@triton.jit
def _combine(o_ptr, ml_ptr, out_ptr, B, H, D, NSPLIT, so_b, so_h, SP: tl.constexpr, DP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SP)
    spm = sp < NSPLIT
    base = (sp * B + b).to(tl.int64) * H + h  # (SP,)
    m = tl.load(ml_ptr + base * 2, mask=spm, other=float("-inf"))
    ll = tl.load(ml_ptr + base * 2 + 1, mask=spm, other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
    total = tl.sum(w * ll, 0)
    d = tl.arange(0, DP)
    o = tl.load(o_ptr + base[:, None] * DP + d[None, :], mask=spm[:, None], other=0.0)  # (SP, DP)
    res = tl.sum(o * w[:, None], 0) / total
    tl.store(out_ptr + b * so_b + h * so_h + d, res.to(out_ptr.dtype.element_ty), mask=d < D)


def splits(capacity: int, programs: int, target: int = 1024, block: int = 64) -> int:
    """How many chunks of positions each row's attention is cut into: about `target` programs in all, chunks of
    at least `block` positions."""
    want = max(1, min(triton.cdiv(capacity, block), triton.cdiv(target, max(programs, 1))))
    return want


def decode_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                     scale: float, nsplit: int | None = None, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    b, H, D = q.shape
    _, KVH, L, _ = K.shape
    G = H // KVH
    W = L + 1 if window is None else min(int(window), L + 1)  # a window past the capacity never binds
    span = min(L, W)  # positions a row attends to at most
    nsplit = nsplit or splits(span, b * KVH)
    bn = 64 if span >= 64 else 16
    chunk = triton.cdiv(triton.cdiv(span, nsplit), bn) * bn
    nsplit = triton.cdiv(span, chunk)
    DP = triton.next_power_of_2(D)
    GP = max(16, triton.next_power_of_2(G))
    q = q if q.stride(2) == 1 else q.contiguous()
    part = torch.empty(nsplit, b, H, DP, dtype=torch.float32, device=q.device)
    ml = torch.empty(nsplit, b, H, 2, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _split[(b, KVH, nsplit)](q, K, V, rows, lengths, part, ml, scale, W, float(softcap or 1.0), b, H, G, D,
                             q.stride(0), q.stride(1), K.stride(0), K.stride(1), K.stride(2),
                             V.stride(0), V.stride(1), V.stride(2), CHUNK=chunk, GP=GP, DP=DP, BN=bn, PREC=prec,
                             SOFTCAP=softcap is not None)
    out = torch.empty(b, H, D, dtype=q.dtype, device=q.device)
    _combine[(b, H)](part, ml, out, b, H, D, nsplit, out.stride(0), out.stride(1),
                     SP=triton.next_power_of_2(nsplit), DP=DP)
    return out
