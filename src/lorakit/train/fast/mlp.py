"""The LoRA MLP with its SwiGLU middle fused (round 2 of issue 7; docs/gpu.md).

    hx = [x | s_g x A_g^T | s_u x A_u^T]                      # (T, H + r_g + r_u), as in layer.py
    y  = hx @ [W_gu | blockdiag(B_g, B_u)]^T = [g | u]        # (T, 2F): base + LoRA in one matmul
    h  = silu(g) * u                                          # (T, F)
    hA = s_d h A_d^T                                          # (T, r_d): the down LoRA's input
    out = h W_d^T + hA B_d^T                                  # (T, H)

`_MlpCore` is y -> (h, hA) together with the gate/up matmul. Its backward gets dh_base = d_out W_d
(the frozen part) and d(hA) = d_out B_d from autograd, and one pass (`swiglu_lora_bwd`) over g, u
and dh_base gives everything else: dh = dh_base + s_d d(hA) A_d, dA_d = s_d d(hA)^T h, dg and du,
dB_g = dg^T (s_g xA_g), dB_u likewise, and d(s xA) = [dg B_g | du B_u]. What the unfused graph did
in four or five passes over (T x F) tensors (SwiGLU backward, the LoRA delta of dh and its add,
the recomputed h for dA_d, dy @ B and dy^T @ sxa over the (T x 2F) gradient) is one read of g, u,
dh_base and one write of dg, du. The forward likewise computes h A_d^T while writing h.

On CUDA with Triton the two passes are the kernels of triton_mlp.py; elsewhere (CPU, the tests'
fp32 reference) the same maths in plain torch (`*_ref`). Both are wrapped as torch custom ops, so
torch.compile treats them as opaque calls inside the compiled layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- reference maths (plain torch)
def swiglu_lora_fwd_ref(y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """y (T, 2F) [g | u], a (r, F) -> h (T, F) in y's dtype, h @ a^T (T, r) fp32."""
    g, u = y.float().chunk(2, dim=-1)
    h = (F.silu(g) * u).to(y.dtype)
    return h, (h @ a.to(y.dtype).t()).float()


def swiglu_lora_bwd_ref(y, dhb, dsha, a, sxa_g, sxa_u, bg, bu):
    """y (T, 2F), dhb (T, F) = d_out W_d, dsha (T, r_d) = s_d d(hA), a (r_d, F), sxa_g (T, r_g),
    sxa_u (T, r_u), bg (F, r_g), bu (F, r_u) -> dy (T, 2F) y's dtype, d_sxa (T, r_g + r_u) fp32,
    dB_g (F, r_g), dB_u (F, r_u), dA_d (r_d, F), all fp32."""
    dt = y.dtype
    g, u = y.float().chunk(2, dim=-1)                                   # (T, F) each
    dh = dhb.float() + (dsha @ a.to(dt)).float()                        # (T, F)
    sg = torch.sigmoid(g)
    silu = g * sg
    h = (silu * u).to(dt)
    da = (dsha.t() @ h).float()                                         # (r_d, F)
    dg = (dh * u * sg * (1 + g * (1 - sg))).to(dt)
    du = (dh * silu).to(dt)
    d_sxa = torch.cat([dg @ bg.to(dt), du @ bu.to(dt)], dim=-1).float()  # (T, r_g + r_u)
    dbg = (dg.t() @ sxa_g).float()                                      # (F, r_g)
    dbu = (du.t() @ sxa_u).float()
    return torch.cat([dg, du], dim=-1), d_sxa, dbg, dbu, da


# ---------------------------------------------------------------- dispatch: Triton on CUDA
def _triton_ok(t: Tensor) -> bool:
    if t.device.type != "cuda" or t.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pad_rows(t: Tensor, n: int) -> Tensor:
    return t if t.shape[0] == n else F.pad(t, (0, 0, 0, n - t.shape[0]))


def _pad_cols(t: Tensor, n: int) -> Tensor:
    return t.contiguous() if t.shape[1] == n else F.pad(t, (0, n - t.shape[1]))


def padded_rank(*ranks: int) -> int:
    """tl.dot needs every dimension >= 16: ranks are zero-padded to a multiple of 16."""
    return max(16, -(-max(ranks) // 16) * 16)


@torch.library.custom_op("lorakit::swiglu_lora_fwd", mutates_args=())
def swiglu_lora_fwd(y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    if not _triton_ok(y):
        return swiglu_lora_fwd_ref(y, a)
    from lorakit.kernels.triton_mlp import swiglu_lora_fwd as kernel

    r = a.shape[0]
    h, ha = kernel(y.contiguous(), _pad_rows(a.to(y.dtype), padded_rank(r)).contiguous())
    return h, ha[:, :r].clone()


@swiglu_lora_fwd.register_fake
def _(y, a):
    return y.new_empty(y.shape[0], y.shape[1] // 2), y.new_empty(y.shape[0], a.shape[0], dtype=torch.float32)


@torch.library.custom_op("lorakit::swiglu_lora_bwd", mutates_args=())
def swiglu_lora_bwd(y: Tensor, dhb: Tensor, dsha: Tensor, a: Tensor, sxa_g: Tensor, sxa_u: Tensor,
                    bg: Tensor, bu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not _triton_ok(y):
        return swiglu_lora_bwd_ref(y, dhb, dsha, a, sxa_g, sxa_u, bg, bu)
    from lorakit.kernels.triton_mlp import swiglu_lora_bwd as kernel

    dt = y.dtype
    rd, rg, ru = a.shape[0], bg.shape[1], bu.shape[1]
    R = padded_rank(rd, rg, ru)
    sxa = torch.cat([_pad_cols(sxa_g.to(dt), R), _pad_cols(sxa_u.to(dt), R)], dim=-1)    # (T, 2R)
    dy, d_sxa, db, dat = kernel(y.contiguous(), dhb.contiguous(), _pad_cols(dsha.to(dt), R),
                                _pad_rows(a.to(dt), R).contiguous(), sxa,
                                _pad_cols(bg.to(dt), R), _pad_cols(bu.to(dt), R))
    d_sxa = torch.cat([d_sxa[:, :rg], d_sxa[:, R:R + ru]], dim=-1)
    # clones: outputs of a custom op may not alias each other (db[0] and db[1] share db's storage)
    return dy, d_sxa, db[0, :, :rg].clone(), db[1, :, :ru].clone(), dat[:, :rd].t().contiguous()


@swiglu_lora_bwd.register_fake
def _(y, dhb, dsha, a, sxa_g, sxa_u, bg, bu):
    f32 = torch.float32
    T, F2 = y.shape
    return (y.new_empty(T, F2), y.new_empty(T, bg.shape[1] + bu.shape[1], dtype=f32),
            y.new_empty(bg.shape, dtype=f32), y.new_empty(bu.shape, dtype=f32), y.new_empty(a.shape, dtype=f32))


# ---------------------------------------------------------------- autograd
class _MlpCore(torch.autograd.Function):
    """(hx, stacked gate/up weight, B_g, B_u, A_d, s_d) -> (h, s_d h A_d^T). Frozen weight and bias
    get no gradient; B_g, B_u, A_d get theirs in their own dtype (fp32 adapters stay fp32)."""

    @staticmethod
    def forward(ctx, hx: Tensor, weight: Tensor, bias: Tensor | None, bg: Tensor, bu: Tensor, a: Tensor,
                scale: float):
        dt = weight.dtype
        lead = hx.shape[:-1]
        hx2 = hx.reshape(-1, hx.shape[-1])                                   # (T, H + r_g + r_u)
        wide = torch.cat([weight, torch.block_diag(bg, bu).to(dt)], dim=1)   # (2F, H + r_g + r_u)
        y = F.linear(hx2, wide, bias)                                        # (T, 2F) [g | u]
        h, ha = swiglu_lora_fwd(y, a)                                        # (T, F), (T, r_d)
        ctx.save_for_backward(hx2, weight, bg, bu, a, y)
        ctx.scale = scale
        f = weight.shape[0] // 2
        return h.view(*lead, f), (ha * scale).to(dt).view(*lead, a.shape[0])

    @staticmethod
    def backward(ctx, dh: Tensor, dha: Tensor):
        hx2, weight, bg, bu, a, y = ctx.saved_tensors
        dt = weight.dtype
        lead = dh.shape[:-1]
        T, H = hx2.shape[0], weight.shape[1]
        rg = bg.shape[1]
        dsha = (dha.reshape(T, -1).float() * ctx.scale).to(dt)              # (T, r_d)
        dy, d_sxa, dbg, dbu, da = swiglu_lora_bwd(
            y, dh.reshape(T, -1), dsha, a, hx2[:, H:H + rg], hx2[:, H + rg:], bg, bu)
        dx = dy @ weight                                                     # (T, H)
        d_hx = torch.cat([dx, d_sxa.to(dt)], dim=-1).view(*lead, -1)        # (..., H + r_g + r_u)
        return d_hx, None, None, dbg.to(bg.dtype), dbu.to(bu.dtype), da.to(a.dtype), None


def fusable_mlp(gate_up, down, training: bool) -> bool:
    """The fused middle needs gate/up stacked with LoRA on both (`Proj.wide`), LoRA on down, and no
    dropout while training (dropout masks would sit between h and A_d)."""
    if not gate_up.wide or len(down.weights) != 1 or down.loras[0] is None:
        return False
    los = list(gate_up.loras) + [down.loras[0]]
    return not training or all(lo.dropout == 0.0 for lo in los)


def fused_mlp(x: Tensor, gate_up, down) -> Tensor:
    """x (b, s, H) (the normed residual) -> the MLP output (b, s, H), LoRA on all three projections."""
    dt = x.dtype
    lg, lu = gate_up.loras
    ld = down.loras[0]
    rg = lg.A.shape[0]
    xa = F.linear(x, torch.cat([lg.A, lu.A]).to(dt))                       # (b, s, r_g + r_u)
    hx = torch.cat([x, xa[..., :rg] * lg.scale, xa[..., rg:] * lu.scale], dim=-1)
    h, ha = _MlpCore.apply(hx, gate_up.weights[0], gate_up.biases[0], lg.B, lu.B, ld.A, ld.scale)
    return F.linear(h, down.weights[0], down.biases[0]) + F.linear(ha, ld.B.to(dt))   # (b, s, H)
