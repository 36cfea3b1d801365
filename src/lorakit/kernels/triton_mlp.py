"""Triton kernels for the SwiGLU middle of a LoRA MLP (see mlp.py for the maths and the reference).

Forward: read gate/up once, write h = silu(g) * u, and accumulate h @ A_down^T on the way (the down
projection's LoRA input), so h is never read back for it.

Backward: read gate/up and dh_base = d_out @ W_down once per element, and from the same tiles
- add the down LoRA's share of dh (s * d(hA) @ A_down, a rank-R update, never written out),
- write dg, du (the gradient of the stacked gate/up matmul),
- accumulate dA_down = (s d(hA))^T h, dB_gate/up = dg^T (s xA), d(s xA) = dg @ B_gate (and up),
so the (tokens x mlp) tensors are touched once instead of four or five times.

Partial sums: each program owns a (TOKS tokens x COLS columns) rectangle. dA/dB partials are per
token group, d(s xA) partials per column group; the caller sums them (tens of MB, deterministic).
The rank R is padded to a multiple of 16 by the caller (tl.dot needs K, N >= 16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FWD_COLS = 2048        # columns per forward program: partial hA is (cdiv(F, FWD_COLS), T, R)
BWD_TOKS, BWD_COLS = 1024, 512


def swiglu_lora_fwd_kernel(y_ptr, at_ptr, h_ptr, part_ptr, T, F, stride_y, stride_h,
         R: tl.constexpr, COLS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)                                     # (BT,)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    kk = tl.arange(0, R)
    acc = tl.zeros((BT, R), dtype=tl.float32)
    for i in range(0, COLS // BO):
        cols = pid_c * COLS + i * BO + tl.arange(0, BO)                      # (BO,)
        cmask = cols < F
        m = rmask[:, None] & cmask[None, :]
        yp = y_ptr + r64[:, None] * stride_y + cols[None, :]
        g = tl.load(yp, mask=m, other=0.0).to(tl.float32)                    # (BT, BO)
        u = tl.load(yp + F, mask=m, other=0.0).to(tl.float32)
        h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + r64[:, None] * stride_h + cols[None, :], h, mask=m)
        at = tl.load(at_ptr + cols[:, None] * R + kk[None, :], mask=cmask[:, None], other=0.0)  # (BO, R)
        acc += tl.dot(h, at)
    tl.store(part_ptr + (pid_c * T + r64[:, None]) * R + kk[None, :], acc, mask=rmask[:, None])


def swiglu_lora_bwd_kernel(y_ptr, dhb_ptr, dsha_ptr, a_ptr, sxa_ptr, bg_ptr, bu_ptr,
         dy_ptr, dxa_ptr, db_ptr, dat_ptr,
         T, F, stride_y, stride_dhb, stride_dy,
         R: tl.constexpr, TOKS: tl.constexpr, COLS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    kk = tl.arange(0, R)
    for i in range(0, COLS // BO):
        cols = pid_c * COLS + i * BO + tl.arange(0, BO)                      # (BO,)
        cmask = cols < F
        a = tl.load(a_ptr + kk[:, None] * F + cols[None, :], mask=cmask[None, :], other=0.0)    # (R, BO)
        bg = tl.load(bg_ptr + cols[:, None] * R + kk[None, :], mask=cmask[:, None], other=0.0)  # (BO, R)
        bu = tl.load(bu_ptr + cols[:, None] * R + kk[None, :], mask=cmask[:, None], other=0.0)
        acc_at = tl.zeros((BO, R), dtype=tl.float32)                         # dA_down^T
        acc_bg = tl.zeros((BO, R), dtype=tl.float32)                         # dB_gate
        acc_bu = tl.zeros((BO, R), dtype=tl.float32)                         # dB_up
        for j in range(0, TOKS // BT):
            rows = pid_t * TOKS + j * BT + tl.arange(0, BT)                  # (BT,)
            rmask = rows < T
            r64 = rows.to(tl.int64)
            m = rmask[:, None] & cmask[None, :]
            yp = y_ptr + r64[:, None] * stride_y + cols[None, :]
            g = tl.load(yp, mask=m, other=0.0).to(tl.float32)                # (BT, BO)
            u = tl.load(yp + F, mask=m, other=0.0).to(tl.float32)
            dsha = tl.load(dsha_ptr + r64[:, None] * R + kk[None, :], mask=rmask[:, None], other=0.0)
            dh = tl.load(dhb_ptr + r64[:, None] * stride_dhb + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dh += tl.dot(dsha, a)                                            # down LoRA's share of dh
            sg = tl.sigmoid(g)
            silu = g * sg
            h = (silu * u).to(dsha.dtype)
            acc_at += tl.dot(tl.trans(h), dsha)                              # (BO, R)
            dg = (dh * u * sg * (1.0 + g * (1.0 - sg))).to(dsha.dtype)
            du = (dh * silu).to(dsha.dtype)
            dp = dy_ptr + r64[:, None] * stride_dy + cols[None, :]
            tl.store(dp, dg, mask=m)
            tl.store(dp + F, du, mask=m)
            sp = sxa_ptr + r64[:, None] * (2 * R) + kk[None, :]
            sxg = tl.load(sp, mask=rmask[:, None], other=0.0)                # (BT, R)
            sxu = tl.load(sp + R, mask=rmask[:, None], other=0.0)
            acc_bg += tl.dot(tl.trans(dg), sxg)
            acc_bu += tl.dot(tl.trans(du), sxu)
            dxg = tl.dot(dg, bg)                                             # (BT, R)
            dxu = tl.dot(du, bu)
            part = dxa_ptr + (pid_c * T + r64[:, None]) * (2 * R) + kk[None, :]
            if i > 0:  # the first column block of this program starts the partial sum
                dxg += tl.load(part, mask=rmask[:, None], other=0.0)
                dxu += tl.load(part + R, mask=rmask[:, None], other=0.0)
            tl.store(part, dxg, mask=rmask[:, None])
            tl.store(part + R, dxu, mask=rmask[:, None])
        cm = cmask[:, None]
        tl.store(dat_ptr + (pid_t * F + cols[:, None]) * R + kk[None, :], acc_at, mask=cm)
        tl.store(db_ptr + ((pid_t * 2) * F + cols[:, None]) * R + kk[None, :], acc_bg, mask=cm)
        tl.store(db_ptr + ((pid_t * 2 + 1) * F + cols[:, None]) * R + kk[None, :], acc_bu, mask=cm)


_fwd_plain = triton.jit(swiglu_lora_fwd_kernel)
_bwd_plain = triton.jit(swiglu_lora_bwd_kernel)
# Registers per thread (ptxas 12.x for sm_90, read here without a GPU; no spills unless noted): fwd
# 32x32/4 warps 123, 64x32/4 239, 32x64/4 240, 64x64/8 249 (64x64/4: 304 B of spills, left out); bwd
# 32x32/4 187, 64x32/4 228, 32x64/4 255 (+24 B stack), 64x64/4 255 (+40 B). Larger tiles spill heavily.
# The autotuner picks among these on the device.
_FWD_CONFIGS = [triton.Config({"BT": bt, "BO": bo}, num_warps=w, num_stages=s)
                for bt, bo, w, s in ((32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2),
                                     (32, 32, 4, 3))]
_BWD_CONFIGS = [triton.Config({"BT": bt, "BO": bo}, num_warps=w, num_stages=s)
                for bt, bo, w, s in ((32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2),
                                     (32, 32, 4, 3), (64, 32, 4, 3))]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["T", "F", "R"])(_fwd_plain)
_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=["T", "F", "R"])(_bwd_plain)


def swiglu_lora_fwd(y: torch.Tensor, a: torch.Tensor, block: tuple | None = None, cols: int = FWD_COLS):
    """y (T, 2F) [gate | up], a (R, F) same dtype, R % 16 == 0 -> h (T, F), h a^T (T, R) fp32.
    block=(BT, BO) skips autotuning (the interpreter tests use it); cols: columns per program
    (a multiple of BO)."""
    T, F = y.shape[0], y.shape[1] // 2
    R = a.shape[0]
    h = torch.empty((T, F), dtype=y.dtype, device=y.device)
    n_c = triton.cdiv(F, cols)
    part = torch.empty((n_c, T, R), dtype=torch.float32, device=y.device)
    args = (y, a.t().contiguous(), h, part, T, F, y.stride(0), h.stride(0))              # a^T: (F, R)
    if block is None:
        _fwd_tuned[lambda meta: (triton.cdiv(T, meta["BT"]), n_c)](*args, R=R, COLS=cols)
    else:
        bt, bo = block
        _fwd_plain[(triton.cdiv(T, bt), n_c)](*args, R=R, COLS=cols, BT=bt, BO=bo)
    return h, part.sum(0)


def swiglu_lora_bwd(y, dhb, dsha, a, sxa, bg, bu, block: tuple | None = None,
                    toks: int = BWD_TOKS, cols: int = BWD_COLS):
    """y (T, 2F), dhb (T, F), dsha (T, R), a (R, F), sxa (T, 2R) [gate | up], bg/bu (F, R), one dtype.
    -> dy (T, 2F), d_sxa (T, 2R) fp32, dB (2, F, R) fp32 [gate, up], dA^T (F, R) fp32.
    toks/cols: the rectangle one program owns (multiples of the block; smaller in tests)."""
    T, F = y.shape[0], y.shape[1] // 2
    R = a.shape[0]
    dy = torch.empty_like(y)
    n_t, n_c = triton.cdiv(T, toks), triton.cdiv(F, cols)
    dxa = torch.empty((n_c, T, 2 * R), dtype=torch.float32, device=y.device)
    db = torch.empty((n_t, 2, F, R), dtype=torch.float32, device=y.device)
    dat = torch.empty((n_t, F, R), dtype=torch.float32, device=y.device)
    args = (y, dhb, dsha, a, sxa, bg, bu, dy, dxa, db, dat, T, F, y.stride(0), dhb.stride(0), dy.stride(0))
    if block is None:
        _bwd_tuned[(n_t, n_c)](*args, R=R, TOKS=toks, COLS=cols)
    else:
        bt, bo = block
        _bwd_plain[(n_t, n_c)](*args, R=R, TOKS=toks, COLS=cols, BT=bt, BO=bo)
    return dy, dxa.sum(0), db.sum(0), dat.sum(0)
