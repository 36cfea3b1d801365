"""Cross-entropy loss and its gradient for one chunk of logits, the gradient written over the logits.

One program per row. Pass 1 streams the row once with an online softmax (running max and sum of
exponentials), so max, sum and the target logit come from one read. Pass 2 reads the row again (a
row is 256 KB for a 128k vocabulary, so most of it is still in L2) and writes
(softmax - onehot) * inv_n in place. The plain-torch `reference.chunk_loss_and_grad` is the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def ce_inplace_kernel(logits_ptr, targets_ptr, loss_ptr, inv_n_ptr, stride, ignore_index,
                      V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)    # running max (scalar)
    s = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)                   # running sum of exp(x - m)
    for off in range(0, V, BLOCK):
        idx = off + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    t_safe = tl.where(valid, t, 0)
    x_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
    scale = tl.where(valid, tl.load(inv_n_ptr), 0.0)
    for off in range(0, V, BLOCK):
        idx = off + offs
        mask = idx < V
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(idx == t_safe, 1.0, 0.0)) * scale
        tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=mask)


_ce_plain = triton.jit(ce_inplace_kernel)
_ce_tuned = triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                             ((2048, 8), (4096, 8), (4096, 16), (8192, 16))],
                            key=["V"], restore_value=["logits_ptr"])(_ce_plain)


def ce_chunk_inplace(logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor, ignore_index: int,
                     block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (c, V) (overwritten), targets (c,), inv_n 0-dim fp32 -> (summed loss over valid rows
    (fp32 scalar), the gradient of the mean loss, which is `logits` itself)."""
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have a unit last stride, got strides {logits.stride()}")
    c, V = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    inv = inv_n.to(torch.float32).reshape(1)
    args = (logits, targets, loss, inv, logits.stride(0), ignore_index, V)
    if block is None:
        _ce_tuned[(c,)](*args)
    else:
        _ce_plain[(c,)](*args, BLOCK=block)
    return loss.sum(), logits
