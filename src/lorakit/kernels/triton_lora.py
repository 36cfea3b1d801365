"""Triton kernels for per-row multi-adapter LoRA; the contract and the plain-torch reference are in
reference.py (`lora_delta`, slot tensors A (S, r, in), B (S, out, r), idx/coef (b, k), optional DoRA).

Two launches a call, over the T = b * s tokens of x (b, s, in):

    shrink   h[p, t, j] = coef[row, j] * x[t] . A[idx[row, j]]^T   over the p-th chunk of `in`
             (P, T, k, RP) fp32 partial sums; P chunks spread a small batch over more programs
    expand   out[t] = sum_j (sum_p h[p, t, j]) . B[idx[row, j]]^T  (+ sum_j coef dora[idx] * base[t])

in two variants, chosen by the row length s:

    gather   (decode, s == 1) a program's rows may each use other slots: every row gathers its own
             slots' A/B tiles and the products are broadcast-multiply-reduce in fp32 (a row is a
             matrix-vector product; rows that share an adapter hit the same tiles in L2)
    segment  (prefill, s > 1) a program's tokens all belong to one row, hence one slot per j:
             tensor-core tl.dot on (tokens x in) @ (in x r) and (tokens x r) @ (r x out) tiles

Per-token coefficients (coef (b, s, k), a mixture of LoRAs) are not supported here: kernels.lora_delta sends
such calls to the reference, and _check refuses a coef whose shape is not idx's.

An entry with idx < 0 or coef == 0 is skipped (nothing loaded, nothing added). Ranks are padded to
a power of two RP (at least 16 for tl.dot) with masked loads, so any r works. Grids depend on shapes
only and nothing syncs with the host: a call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# BK: shrink chunk of `in`; BM x BO: rows x outputs per expand program; target: shrink programs wanted (SMs x 2);
# blocks: at least this many BK chunks per shrink program
# GATHER: the best of six configs for a llama-1b layer at 64 rows, grouped and per projection alike
# (bench/results/gpu_serve_kernels_h100_2026-12-06.jsonl: many small shrink programs, 16 rows an expand program;
# it was BK=128, BM=4, BO=64, target=512, blocks=4)
GATHER = dict(BK=64, BM=16, BO=64, target=4096, blocks=1)
SEGMENT = dict(BK=64, BM=64, BO=128, target=256, blocks=4)


@triton.jit
def _shrink_gather(x_ptr, a_ptr, idx_ptr, coef_ptr, h_ptr, T, S_LEN, IN, K, R, sx, sa_s, sa_r,
                   CHUNK: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    j = tl.program_id(1)
    sp = tl.program_id(2)
    row = t // S_LEN
    slot = tl.load(idx_ptr + row * K + j)
    c = tl.load(coef_ptr + row * K + j)
    if (slot >= 0) & (c != 0):
        rr = tl.arange(0, RP)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        a_row = a_ptr + slot.to(tl.int64) * sa_s + rr[:, None] * sa_r  # (RP, 1)
        for k0 in range(sp * CHUNK, sp * CHUNK + CHUNK, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < IN
            xv = tl.load(x_ptr + t.to(tl.int64) * sx + kk, mask=km, other=0.0).to(tl.float32)  # (BK,)
            av = tl.load(a_row + kk[None, :], mask=(rr[:, None] < R) & km[None, :], other=0.0)  # (RP, BK)
            acc += av.to(tl.float32) * xv[None, :]
        h = tl.sum(acc, axis=1) * c  # (RP,)
        tl.store(h_ptr + ((sp * T + t).to(tl.int64) * K + j) * RP + rr, h)


@triton.jit
def _expand_gather(h_ptr, b_ptr, idx_ptr, coef_ptr, d_ptr, base_ptr, out_ptr, T, S_LEN, OUT, K, R,
                   sb_s, sb_o, sd_s, sbase, so, NSPLIT: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                   BO: tl.constexpr, DORA: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,) tokens
    tm = t < T
    row = t // S_LEN
    o = tl.program_id(1) * BO + tl.arange(0, BO)  # (BO,)
    om = o < OUT
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    gain = tl.zeros((BM, BO), dtype=tl.float32)
    for j in range(K):
        slot = tl.load(idx_ptr + row * K + j, mask=tm, other=-1)  # (BM,)
        c = tl.load(coef_ptr + row * K + j, mask=tm, other=0.0)
        ok = tm & (slot >= 0) & (c != 0)
        s64 = tl.where(ok, slot, 0).to(tl.int64)
        hp = h_ptr + (t.to(tl.int64)[:, None] * K + j) * RP + rr[None, :]  # (BM, RP)
        h = tl.zeros((BM, RP), dtype=tl.float32)
        for sp in tl.static_range(NSPLIT):
            h += tl.load(hp + sp * T * K * RP, mask=ok[:, None], other=0.0)
        bp = b_ptr + s64[:, None, None] * sb_s + o[None, :, None] * sb_o + rr[None, None, :]  # (BM, BO, RP)
        bm = ok[:, None, None] & om[None, :, None] & (rr[None, None, :] < R)
        bv = tl.load(bp, mask=bm, other=0.0).to(tl.float32)
        acc += tl.sum(bv * h[:, None, :], axis=2)
        if DORA:
            dv = tl.load(d_ptr + s64[:, None] * sd_s + o[None, :], mask=ok[:, None] & om[None, :], other=0.0)
            gain += c[:, None] * dv.to(tl.float32)
    m2 = tm[:, None] & om[None, :]
    if DORA:
        bs = tl.load(base_ptr + t.to(tl.int64)[:, None] * sbase + o[None, :], mask=m2, other=0.0)
        acc += gain * bs.to(tl.float32)
    op = out_ptr + t.to(tl.int64)[:, None] * so + o[None, :]
    if ACC:  # added to what out holds (the base output): out + delta rounded once
        acc += tl.load(op, mask=m2, other=0.0).to(tl.float32)
    tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _shrink_segment(x_ptr, a_ptr, idx_ptr, coef_ptr, h_ptr, T, S_LEN, IN, K, R, sx, sa_s, sa_r,
                    CHUNK: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    PREC: tl.constexpr):
    nblk = tl.cdiv(S_LEN, BM)
    row = tl.program_id(0) // nblk
    pos = (tl.program_id(0) % nblk) * BM + tl.arange(0, BM)  # (BM,) positions in the row
    tm = pos < S_LEN
    t = (row * S_LEN + pos).to(tl.int64)
    j = tl.program_id(1)
    sp = tl.program_id(2)
    slot = tl.load(idx_ptr + row * K + j)
    c = tl.load(coef_ptr + row * K + j)
    if (slot >= 0) & (c != 0):
        rr = tl.arange(0, RP)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        a_col = a_ptr + slot.to(tl.int64) * sa_s + rr[None, :] * sa_r  # (1, RP)
        for k0 in range(sp * CHUNK, sp * CHUNK + CHUNK, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < IN
            xv = tl.load(x_ptr + t[:, None] * sx + kk[None, :], mask=tm[:, None] & km[None, :], other=0.0)
            at = tl.load(a_col + kk[:, None], mask=km[:, None] & (rr[None, :] < R), other=0.0)  # (BK, RP)
            acc = tl.dot(xv, at, acc, input_precision=PREC)
        hp = h_ptr + ((sp * T + t)[:, None] * K + j) * RP + rr[None, :]
        tl.store(hp, acc * c, mask=tm[:, None])


@triton.jit
def _expand_segment(h_ptr, b_ptr, idx_ptr, coef_ptr, d_ptr, base_ptr, out_ptr, T, S_LEN, OUT, K, R,
                    sb_s, sb_o, sd_s, sbase, so, NSPLIT: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                    BO: tl.constexpr, PREC: tl.constexpr, DORA: tl.constexpr, ACC: tl.constexpr):
    nblk = tl.cdiv(S_LEN, BM)
    row = tl.program_id(0) // nblk
    pos = (tl.program_id(0) % nblk) * BM + tl.arange(0, BM)
    tm = pos < S_LEN
    t = (row * S_LEN + pos).to(tl.int64)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < OUT
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    gain = tl.zeros((BO,), dtype=tl.float32)
    for j in range(K):
        slot = tl.load(idx_ptr + row * K + j)
        c = tl.load(coef_ptr + row * K + j)
        if (slot >= 0) & (c != 0):
            hp = h_ptr + (t[:, None] * K + j) * RP + rr[None, :]  # (BM, RP)
            h = tl.zeros((BM, RP), dtype=tl.float32)
            for sp in tl.static_range(NSPLIT):
                h += tl.load(hp + sp * T * K * RP, mask=tm[:, None], other=0.0)
            bt = tl.load(b_ptr + slot.to(tl.int64) * sb_s + o[None, :] * sb_o + rr[:, None],
                         mask=(rr[:, None] < R) & om[None, :], other=0.0)  # (RP, BO)
            acc = tl.dot(h.to(bt.dtype), bt, acc, input_precision=PREC)
            if DORA:
                dv = tl.load(d_ptr + slot.to(tl.int64) * sd_s + o, mask=om, other=0.0)
                gain += c * dv.to(tl.float32)
    m2 = tm[:, None] & om[None, :]
    if DORA:
        bs = tl.load(base_ptr + t[:, None] * sbase + o[None, :], mask=m2, other=0.0)
        acc += gain[None, :] * bs.to(tl.float32)
    op = out_ptr + t[:, None] * so + o[None, :]
    if ACC:
        acc += tl.load(op, mask=m2, other=0.0).to(tl.float32)
    tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=m2)


def split_in(n_in: int, bk: int, programs: int, target: int, blocks: int = 4) -> tuple[int, int]:
    """(chunk of `in` per shrink program, number of chunks): about `target` programs in all, chunks of at least
    `blocks` x bk."""
    want = max(1, min(triton.cdiv(n_in, blocks * bk), triton.cdiv(target, max(programs, 1))))
    chunk = triton.cdiv(triton.cdiv(n_in, want), bk) * bk
    return chunk, triton.cdiv(n_in, chunk)


def _check(x, A, B, idx, coef, dora, base):
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3 or idx.dim() != 2:
        raise ValueError(f"expected x (b, s, in), A (S, r, in), B (S, out, r), idx (b, k); got "
                         f"{tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, {tuple(idx.shape)}")
    b, _, n_in = x.shape
    if A.shape[2] != n_in or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1] or idx.shape[0] != b \
            or coef.shape != idx.shape:
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"idx {tuple(idx.shape)}, coef {tuple(coef.shape)}")
    if not (x.dtype == A.dtype == B.dtype):
        raise ValueError(f"x, A and B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    if (dora is None) != (base is None):
        raise ValueError("dora and base go together (base = W x for DoRA slots)")
    if dora is not None and (dora.shape != (A.shape[0], B.shape[1]) or base.shape != (*x.shape[:2], B.shape[1])):
        raise ValueError(f"dora must be {(A.shape[0], B.shape[1])} and base {(*x.shape[:2], B.shape[1])}, "
                         f"got {tuple(dora.shape)} and {tuple(base.shape)}")


def lora_delta(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
               coef: torch.Tensor, dora: torch.Tensor | None = None, base: torch.Tensor | None = None,
               mode: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, s, in) -> delta (b, s, out), as reference.lora_delta. mode: "gather" | "segment" | None
    (gather for s == 1, segment otherwise). out: (b, s, out) of x's dtype, contiguous rows: the delta is added
    to it in place (one rounding) and it is returned."""
    _check(x, A_slots, B_slots, idx, coef, dora, base)
    b, s, n_in = x.shape
    S, r, _ = A_slots.shape
    n_out, k, T = B_slots.shape[1], idx.shape[1], b * s
    acc = out is not None
    if acc and (out.shape != (b, s, n_out) or out.dtype != x.dtype or out.stride(2) != 1
                or out.stride(0) != s * out.stride(1)):
        raise ValueError(f"out must be ({b}, {s}, {n_out}) {x.dtype} with rows one after the other, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    out = out if acc else torch.empty(b, s, n_out, dtype=x.dtype, device=x.device)
    if T == 0 or k == 0 or n_out == 0:
        return out if acc else out.zero_()
    mode = mode or ("gather" if s == 1 else "segment")
    if mode not in ("gather", "segment"):
        raise ValueError(f"mode must be 'gather' or 'segment', got {mode!r}")
    x2 = x.reshape(T, n_in)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    A = A_slots if A_slots.stride(2) == 1 else A_slots.contiguous()
    B = B_slots if B_slots.stride(2) == 1 else B_slots.contiguous()
    idx = idx.to(torch.int64).contiguous()
    coef = coef.to(torch.float32).contiguous()
    has_dora = dora is not None
    if has_dora:
        dora = dora if dora.stride(1) == 1 else dora.contiguous()
        base = base.reshape(T, n_out)
        base = base if base.stride(1) == 1 else base.contiguous()
    d_arg, base_arg = (dora, base) if has_dora else (coef, coef)  # unread when DORA is off
    sd, sbase = (dora.stride(0), base.stride(0)) if has_dora else (0, 0)
    out2 = out.view(T, n_out) if out.is_contiguous() else out.as_strided((T, n_out), (out.stride(1), 1))
    if mode == "gather":
        cfg = GATHER
        RP = triton.next_power_of_2(max(r, 1))
        chunk, nsplit = split_in(n_in, cfg["BK"], T * k, cfg["target"], cfg.get("blocks", 4))
        h = torch.empty(nsplit, T, k, RP, dtype=torch.float32, device=x.device)
        _shrink_gather[(T, k, nsplit)](x2, A, idx, coef, h, T, s, n_in, k, r, x2.stride(0), A.stride(0),
                                       A.stride(1), CHUNK=chunk, RP=RP, BK=cfg["BK"])
        grid = (triton.cdiv(T, cfg["BM"]), triton.cdiv(n_out, cfg["BO"]))
        _expand_gather[grid](h, B, idx, coef, d_arg, base_arg, out2, T, s, n_out, k, r, B.stride(0), B.stride(1),
                             sd, sbase, out2.stride(0), NSPLIT=nsplit, RP=RP, BM=cfg["BM"], BO=cfg["BO"],
                             DORA=has_dora, ACC=acc)
        return out
    cfg = SEGMENT
    RP = max(16, triton.next_power_of_2(r))
    BM = min(cfg["BM"], max(16, triton.next_power_of_2(s)))
    blocks = b * triton.cdiv(s, BM)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    chunk, nsplit = split_in(n_in, cfg["BK"], blocks * k, cfg["target"], cfg.get("blocks", 4))
    h = torch.empty(nsplit, T, k, RP, dtype=torch.float32, device=x.device)
    _shrink_segment[(blocks, k, nsplit)](x2, A, idx, coef, h, T, s, n_in, k, r, x2.stride(0), A.stride(0),
                                         A.stride(1), CHUNK=chunk, RP=RP, BM=BM, BK=cfg["BK"], PREC=prec)
    grid = (blocks, triton.cdiv(n_out, cfg["BO"]))
    _expand_segment[grid](h, B, idx, coef, d_arg, base_arg, out2, T, s, n_out, k, r, B.stride(0), B.stride(1),
                          sd, sbase, out2.stride(0), NSPLIT=nsplit, RP=RP, BM=BM, BO=cfg["BO"], PREC=prec,
                          DORA=has_dora, ACC=acc)
    return out


# ---------------------------------------------------------------------------------------------------- folded decode
# An experiment for the serving decode step (measured in bench/gpu_serve_kernels.py, `folded`; not used by the
# engine yet): the shrink of every resident slot rides in the base matmul, y_ext = x @ [W; A_0; ..; A_{S-1}]^T,
# so a projection is one cuBLAS matmul and one expand launch instead of a matmul and two launches. The expand
# reads each row's slot columns of y_ext's tail, h = y_ext[t, out + slot * R : out + slot * R + r].


@triton.jit
def _expand_folded(y_ptr, b_ptr, idx_ptr, coef_ptr, T, OUT, K, R, sy, sb_s, sb_o,
                   RP: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr):
    t = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,) rows (one token each)
    tm = t < T
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < OUT
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for j in range(K):
        slot = tl.load(idx_ptr + t * K + j, mask=tm, other=-1)
        c = tl.load(coef_ptr + t * K + j, mask=tm, other=0.0)
        ok = tm & (slot >= 0) & (c != 0)
        s64 = tl.where(ok, slot, 0).to(tl.int64)
        hp = y_ptr + t.to(tl.int64)[:, None] * sy + OUT + s64[:, None] * R + rr[None, :]  # (BM, RP)
        h = tl.load(hp, mask=ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32) * c[:, None]
        bp = b_ptr + s64[:, None, None] * sb_s + o[None, :, None] * sb_o + rr[None, None, :]  # (BM, BO, RP)
        bv = tl.load(bp, mask=ok[:, None, None] & om[None, :, None] & (rr[None, None, :] < R), other=0.0)
        acc += tl.sum(bv.to(tl.float32) * h[:, None, :], axis=2)
    yp = y_ptr + t.to(tl.int64)[:, None] * sy + o[None, :]
    m2 = tm[:, None] & om[None, :]
    acc += tl.load(yp, mask=m2, other=0.0).to(tl.float32)
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m2)


def fold_weight(W: torch.Tensor, A_slots: torch.Tensor) -> torch.Tensor:
    """[W; A_0; ..; A_{S-1}] (out + S * r, in): the base weight with every slot's A under it."""
    S, r, n_in = A_slots.shape
    return torch.cat([W, A_slots.reshape(S * r, n_in)], 0)


def folded_decode(x: torch.Tensor, W_ext: torch.Tensor, n_out: int, B_slots: torch.Tensor, idx: torch.Tensor,
                  coef: torch.Tensor) -> torch.Tensor:
    """x (T, in) one token a row -> x W^T + each row's sum_j coef[t, j] B[idx[t, j]] A[idx[t, j]] x, (T, out),
    from one matmul with W_ext = fold_weight(W, A_slots) and one expand launch. Returns a view of the matmul's
    output (rows of out + S * r)."""
    T = x.shape[0]
    S, _, R = B_slots.shape
    if W_ext.shape[0] != n_out + S * R or idx.shape[0] != T or coef.shape != idx.shape:
        raise ValueError(f"W_ext {tuple(W_ext.shape)}, B {tuple(B_slots.shape)}, idx {tuple(idx.shape)}, "
                         f"coef {tuple(coef.shape)} do not agree with out={n_out}, {T} rows")
    y = x @ W_ext.T  # (T, out + S * R)
    B = B_slots if B_slots.stride(2) == 1 else B_slots.contiguous()
    idx = idx.to(torch.int64).contiguous()
    coef = coef.to(torch.float32).contiguous()
    cfg = GATHER
    grid = (triton.cdiv(T, cfg["BM"]), triton.cdiv(n_out, cfg["BO"]))
    _expand_folded[grid](y, B, idx, coef, T, n_out, idx.shape[1], R, y.stride(0), B.stride(0), B.stride(1),
                         RP=triton.next_power_of_2(max(R, 1)), BM=cfg["BM"], BO=cfg["BO"])
    return y[:, :n_out]
