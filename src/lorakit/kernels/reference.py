"""Plain-torch reference for per-row (multi-adapter) LoRA: the path every faster kernel is tested against.

The resident adapters of one linear layer are stacked into slot tensors:

    A_slots (S, r, in)    B_slots (S, out, r)     ranks zero-padded to a common r; slot 0 is all zeros

and every row of a batch names up to k slots with a coefficient each (a weighted stack is k > 1;
padding entries use slot 0 or coefficient 0):

    idx (b, k) long       coef (b, k) float       coef = stack weight * the adapter's scale (alpha / r)

    delta[b] = sum_j coef[b, j] * (x[b] @ A_slots[idx[b, j]].T) @ B_slots[idx[b, j]].T

A weighted stack is computed as one low-rank product by concatenating ranks, so it is the exact
weighted sum of the adapters' weight changes (no cross terms).
"""
from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
               coef: torch.Tensor) -> torch.Tensor:
    """x (b, s, in) -> delta (b, s, out). Gather each row's A/B, then two batched matmuls."""
    b, k = idx.shape
    r = A_slots.shape[1]
    flat = idx.reshape(-1)
    A = A_slots.index_select(0, flat)  # (b*k, r, in)  (index_select: far cheaper than A_slots[idx] on CPU)
    B = B_slots.index_select(0, flat)  # (b*k, out, r)
    if k == 1:
        h = torch.bmm(x, A.transpose(1, 2))  # (b, s, r)
        return torch.bmm(h, B.transpose(1, 2)) * coef.to(x.dtype)[:, :, None]  # (b, s, out)
    A = A.reshape(b, k * r, -1)  # (b, k*r, in): the stack's ranks concatenated
    B = B.reshape(b, k, B.shape[1], r).permute(0, 2, 1, 3).reshape(b, B.shape[1], k * r)  # (b, out, k*r)
    h = torch.bmm(x, A.transpose(1, 2))  # (b, s, k*r)
    h = h * coef.to(x.dtype).repeat_interleave(r, dim=1)[:, None, :]  # each rank block times its coefficient
    return torch.bmm(h, B.transpose(1, 2))  # (b, s, out)


def lora_delta_loop(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
                    coef: torch.Tensor) -> torch.Tensor:
    """The definition, row by row and slot by slot (slow; for tests)."""
    out = torch.zeros(*x.shape[:2], B_slots.shape[1], dtype=x.dtype, device=x.device)  # (b, s, out)
    for row in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            s = int(idx[row, j])
            out[row] += float(coef[row, j]) * (x[row] @ A_slots[s].T) @ B_slots[s].T
    return out
