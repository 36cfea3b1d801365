"""QLoRA's linear layer as one autograd step: y = x W^T + b + s (xd A^T) B^T with W dequantized from 4 bits.

What it saves for backward: x (the compute dtype, shared by the base and the low-rank path; xd too only when
dropout makes it differ) and h = s xd A^T (n, r). No dense W (dequantized again in backward, through the same
library kernel), no float32 copy of x: the adapters' float32 master weights are cast to the compute dtype
inside, so the low-rank matmuls run in bf16 on a bf16 base (as the fast backend does), and their gradients
come back in the masters' dtype. The generic path (LoraLinear.forward) casts x up to the adapter's dtype
instead, which on a bf16 base keeps a float32 copy of every adapted input for backward.

    forward   y  = x W^T + b;  h = s xd A^T (n, r);  y += h B^T            (addmm: no (n, out) temporary)
    backward  g  = dy B (n, r);  dx = dy W + s g A;  dA = s g^T xd;  dB = dy^T h
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, A, B, qweight, bias, scale: float):
        # x, xd (..., in) compute dtype; A (r, in), B (out, r) masters; qweight: NF4Weight
        dt, shape = x.dtype, x.shape
        x2, xd2 = x.reshape(-1, shape[-1]), xd.reshape(-1, shape[-1])  # (n, in)
        y = F.linear(x2, qweight.dequantize(dt), None if bias is None else bias.to(dt))  # (n, out)
        h = F.linear(xd2, A.to(dt)) * scale  # (n, r)
        y = torch.addmm(y, h, B.to(dt).t())  # (n, out)
        ctx.same = xd is x
        ctx.qweight, ctx.scale = qweight, scale
        ctx.save_for_backward(x2, None if ctx.same else xd2, h, A, B)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xd2, h, A, B = ctx.saved_tensors
        xd2 = x2 if ctx.same else xd2
        dt, shape = x2.dtype, dy.shape
        dy2 = dy.reshape(-1, shape[-1]).to(dt)  # (n, out)
        a = A.to(dt)  # (r, in)
        g = dy2 @ B.to(dt)  # (n, r)
        dx = dxd = dA = dB = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx = dy2 @ ctx.qweight.dequantize(dt)  # (n, in)
            low = (g * ctx.scale) @ a  # (n, in) share of the low-rank path, through xd
            if ctx.same:
                dx = dx.add_(low)
            else:
                dxd = low.view(*shape[:-1], -1)
            dx = dx.view(*shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            dA = (g.t() @ xd2 * ctx.scale).to(A.dtype)  # (r, in)
        if ctx.needs_input_grad[3]:
            dB = (dy2.t() @ h).to(B.dtype)  # (out, r)
        return dx, dxd, dA, dB, None, None, None


def qlora_linear(x: torch.Tensor, xd: torch.Tensor, A: torch.Tensor, B: torch.Tensor, qweight,
                 bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """x W^T + b + scale (xd A^T) B^T, W = qweight.dequantize(x.dtype). xd: dropout(x), or x itself."""
    return _QLoraLinear.apply(x, xd, A, B, qweight, bias, scale)
