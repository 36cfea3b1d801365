"""Grouped decode kernels: the adapters of two or three projections that read the same input (q, k and v; gate and
up) in one shrink launch and one expand launch, instead of two launches per projection.

A decode step's adapter time is launch-bound: one layer's seven projections cost two small launches each, and one
adapter costs about what 32 do (bench/results/gpu_serve_kernels_h200_2026-11-29.jsonl: 0.138 vs 0.148 ms a layer
against 0.064 ms for the base matmuls). Grouping takes a llama layer from 14 launches to 8.

For members g = 0..G-1 (G <= 3) with slot banks A_g (S, r_g, in) and B_g (S, out_g, r_g), contiguous, and outputs
out_g (T, out_g) with rows one after the other (the base outputs, added into in place):

    shrink   h[p, t, j, g] = coef[t, j] * x[t] . A_g[idx[t, j]]^T   over the p-th chunk of `in`, fp32
    expand   out_g[t] += sum_j (sum_p h[p, t, j, g]) . B_g[idx[t, j]]^T

One token a row (s == 1), as triton_lora's gather variant, whose contract (slot < 0 or coef == 0: nothing added)
this keeps. kernels.lora_add_group dispatches here; anything else runs lora_add per member.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels import triton_lora
from lorakit.kernels.triton_lora import split_in


@triton.jit
def _pick(g, p0, p1, p2, G: tl.constexpr):
    """Member g's pointer. Members past G are None (never the same tensor twice: torch.compile's functional
    wrapper of a Triton kernel cannot take one mutated tensor as two arguments)."""
    if G == 1:
        p = p0
    elif G == 2:
        if g == 0:
            p = p0
        else:
            p = p1
    else:
        if g == 0:
            p = p0
        elif g == 1:
            p = p1
        else:
            p = p2
    return p


@triton.jit
def _shrink_group(x_ptr, a0, a1, a2, idx_ptr, coef_ptr, h_ptr, T, IN, K, R0, R1, R2, sx,
                  G: tl.constexpr, CHUNK: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1) // K
    j = tl.program_id(1) % K
    sp = tl.program_id(2)
    R = tl.where(g == 0, R0, tl.where(g == 1, R1, R2))
    a_ptr = _pick(g, a0, a1, a2, G)
    slot = tl.load(idx_ptr + t * K + j)
    c = tl.load(coef_ptr + t * K + j)
    if (slot >= 0) & (c != 0):
        rr = tl.arange(0, RP)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        a_row = a_ptr + slot.to(tl.int64) * R * IN + rr[:, None] * IN  # (RP, 1)
        for k0 in range(sp * CHUNK, sp * CHUNK + CHUNK, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < IN
            xv = tl.load(x_ptr + t.to(tl.int64) * sx + kk, mask=km, other=0.0).to(tl.float32)
            av = tl.load(a_row + kk[None, :], mask=(rr[:, None] < R) & km[None, :], other=0.0)
            acc += av.to(tl.float32) * xv[None, :]
        h = tl.sum(acc, axis=1) * c
        tl.store(h_ptr + (((sp * T + t).to(tl.int64) * K + j) * G + g) * RP + rr, h)


@triton.jit
def _expand_group(h_ptr, b0, b1, b2, o0, o1, o2, idx_ptr, coef_ptr, T, K, R0, R1, R2, N0, N1, N2, so0, so1, so2,
                  G: tl.constexpr, NSPLIT: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr):
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    tm = t < T
    col = tl.program_id(1)
    nb0 = tl.cdiv(N0, BO)
    nb1 = tl.cdiv(N1, BO)
    g = (col >= nb0).to(tl.int32) + (col >= nb0 + nb1).to(tl.int32)
    ob = col - tl.where(g == 0, 0, tl.where(g == 1, nb0, nb0 + nb1))
    R = tl.where(g == 0, R0, tl.where(g == 1, R1, R2))
    N = tl.where(g == 0, N0, tl.where(g == 1, N1, N2))
    so = tl.where(g == 0, so0, tl.where(g == 1, so1, so2))
    b_ptr = _pick(g, b0, b1, b2, G)
    out_ptr = _pick(g, o0, o1, o2, G)
    o = ob * BO + tl.arange(0, BO)
    om = o < N
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for j in range(K):
        slot = tl.load(idx_ptr + t * K + j, mask=tm, other=-1)
        c = tl.load(coef_ptr + t * K + j, mask=tm, other=0.0)
        ok = tm & (slot >= 0) & (c != 0)
        s64 = tl.where(ok, slot, 0).to(tl.int64)
        hp = h_ptr + ((t.to(tl.int64)[:, None] * K + j) * G + g) * RP + rr[None, :]  # (BM, RP)
        h = tl.zeros((BM, RP), dtype=tl.float32)
        for sp in tl.static_range(NSPLIT):
            h += tl.load(hp + sp * T * K * G * RP, mask=ok[:, None], other=0.0)
        bp = b_ptr + s64[:, None, None] * N * R + o[None, :, None] * R + rr[None, None, :]  # (BM, BO, RP)
        bv = tl.load(bp, mask=ok[:, None, None] & om[None, :, None] & (rr[None, None, :] < R), other=0.0)
        acc += tl.sum(bv.to(tl.float32) * h[:, None, :], axis=2)
    m2 = tm[:, None] & om[None, :]
    op = out_ptr + t.to(tl.int64)[:, None] * so + o[None, :]
    acc += tl.load(op, mask=m2, other=0.0).to(tl.float32)
    tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=m2)


def lora_add_group(outs: list[torch.Tensor], x: torch.Tensor, As: list[torch.Tensor], Bs: list[torch.Tensor],
                   idx: torch.Tensor, coef: torch.Tensor) -> list[torch.Tensor]:
    """outs[g] (T, out_g) += lora_delta(x, As[g], Bs[g], idx, coef) for each member, x (T, in) one token a row,
    idx and coef (T, k); two launches in all. x and outs may also be (T, 1, n) (a decode step's tensors, passed
    as they are: no views to write through). Returns outs."""
    G = len(outs)
    if not 1 <= G <= 3 or len(As) != G or len(Bs) != G:
        raise ValueError(f"1 to 3 members, as many A and B as outputs; got {G}, {len(As)}, {len(Bs)}")
    T, n_in = x.shape[0], x.shape[-1]
    k = idx.shape[1]
    for o, A, B in zip(outs, As, Bs):
        if not (A.is_contiguous() and B.is_contiguous()) or A.shape[2] != n_in or B.shape[2] != A.shape[1] \
                or B.shape[0] != A.shape[0] or tuple(o.shape) not in ((T, B.shape[1]), (T, 1, B.shape[1])) \
                or o.stride(-1) != 1 or x.dim() != o.dim() or not (x.dtype == A.dtype == B.dtype == o.dtype):
            raise ValueError(f"member shapes do not agree: x {tuple(x.shape)}, A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}, out {tuple(o.shape)} (contiguous banks, one dtype)")
    if x.dim() == 3 and x.shape[1] != 1:
        raise ValueError(f"one token a row: x must be (T, in) or (T, 1, in), got {tuple(x.shape)}")
    if idx.shape != (T, k) or coef.shape != (T, k):
        raise ValueError(f"idx and coef must be ({T}, k), got {tuple(idx.shape)}, {tuple(coef.shape)}")
    if T == 0 or k == 0:
        return outs
    # 2-D views (T, n) for the kernels: torch.compile's functional wrapper of a Triton kernel fails on mutated
    # arguments with a size-1 dimension under dynamic shapes (pytorch/pytorch#181735), and lora_delta does the same
    x = x.reshape(T, n_in)
    x = x if x.stride(-1) == 1 else x.contiguous()
    flat = [o.view(T, o.shape[-1]) for o in outs]
    idx = idx.to(torch.int64).contiguous()
    coef = coef.to(torch.float32).contiguous()
    pad = lambda seq, fill: list(seq) + [fill] * (3 - G)  # noqa: E731  members past G: None or 0
    ranks = [A.shape[1] for A in As]
    RP = triton.next_power_of_2(max(max(ranks), 1))
    cfg = triton_lora.GATHER  # read at the call: the kernel bench times other configs by replacing it
    chunk, nsplit = split_in(n_in, cfg["BK"], T * k * G, cfg["target"], cfg.get("blocks", 4))
    h = torch.empty(nsplit, T, k, G, RP, dtype=torch.float32, device=x.device)
    R = pad(ranks, 0)
    _shrink_group[(T, k * G, nsplit)](x, *pad(As, None), idx, coef, h, T, n_in, k, *R, x.stride(0),
                                      G=G, CHUNK=chunk, RP=RP, BK=cfg["BK"])
    N = pad([B.shape[1] for B in Bs], 0)
    blocks = sum(triton.cdiv(n, cfg["BO"]) for n in N)
    _expand_group[(triton.cdiv(T, cfg["BM"]), blocks)](
        h, *pad(Bs, None), *pad(flat, None), idx, coef, T, k, *R, *N, *pad([o.stride(0) for o in flat], 0),
        G=G, NSPLIT=nsplit, RP=RP, BM=cfg["BM"], BO=cfg["BO"])
    return outs
