"""Linear + cross-entropy without the (tokens x vocab) logits tensor.

HF computes logits = h W^T for every token (16k tokens x 128k vocab is 4 GiB in bf16, 8 GiB once
upcast to float32, and autograd keeps both), then cross-entropy. Here the tokens go through in
chunks: for each chunk the logits are formed, the loss and its gradient (softmax - onehot) / n are
computed at once, the gradient is pushed through W right away (dh = g W, and dW += g^T h when W
trains), and the chunk's logits are dropped. Forward therefore does the backward's matmul too;
backward only scales the stored dh (and dW) by the incoming gradient. Peak extra memory: one
chunk's logits and gradient.

Numerics match HF's ForCausalLMLoss: logits in the model dtype (the matmul output), softmax in
float32, mean over the targets that are not `ignore_index`. A chunk's loss and gradient is one op of lorakit.kernels
(`ce_chunk`: the Triton kernel on CUDA, the plain-torch `reference.chunk_loss_and_grad` elsewhere).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels.reference import chunk_loss_and_grad

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int,
                chunk_fn) -> Tensor:
        # h (T, d), weight (V, d), targets (T,)
        ctx.weight_dtype = weight.dtype
        acc = torch.promote_types(h.dtype, torch.float32)
        n = (targets != ignore_index).sum()
        inv_n = 1.0 / n.to(acc)  # 0 valid targets: inf, and the loss is nan as in HF
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]                                              # (c, d)
            logits = hc @ weight.t()                                         # (c, V)
            loss_c, g = chunk_fn(logits, targets[i:i + chunk], inv_n, ignore_index)
            del logits
            total += loss_c
            if dh is not None:
                torch.mm(g, weight, out=dh[i:i + chunk])                     # (c, d)
            if dw is not None:
                dw += (g.t() @ hc).to(acc)                                   # (V, d)
        ctx.save_for_backward(dh, dw)
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dh, dw = ctx.saved_tensors
        gh = None if dh is None else dh * grad_out.to(dh.dtype)
        gw = None if dw is None else (dw * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, chunk: int = 2048,
                         ignore_index: int = IGNORE_INDEX, chunk_fn=None) -> Tensor:
    """mean over valid targets of CE(h W^T, targets). h (T, d), weight (V, d), targets (T,) long.
    `chunk_fn` defaults to the plain-torch `chunk_loss_and_grad` (pass a compiled one on GPU)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (T, d) and weight (V, d) with the same d, got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return _LinearCrossEntropy.apply(h.contiguous(), weight, targets, chunk, ignore_index,
                           chunk_fn or chunk_loss_and_grad)


def shift_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """HF's causal-LM shift: position t predicts labels[t + 1]; the last position predicts nothing.
    (b, s) -> (b * s,)"""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1)


def default_chunk(vocab: int, budget_elems: int = 1 << 28) -> int:
    """Tokens per chunk so that one chunk's logits hold about `budget_elems` values (512 MiB bf16)."""
    c = max(256, budget_elems // max(vocab, 1))
    return 1 << (c.bit_length() - 1)  # a power of two: the compiled chunk kernel sees few shapes
