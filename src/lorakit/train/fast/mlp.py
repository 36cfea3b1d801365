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

The two passes are ops of lorakit.kernels (`swiglu_lora_fwd`, `swiglu_lora_bwd`): on CUDA with Triton the kernels
of kernels/triton_mlp.py, elsewhere (CPU, the tests' fp32 reference) the same maths in plain torch
(kernels/reference.py). Both are torch custom ops, so torch.compile treats them as opaque calls inside the
compiled layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels import swiglu_lora_bwd, swiglu_lora_fwd


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
