"""Plain-torch references: the maths every faster kernel is tested against and the path that runs where no kernel
does. Per-row (multi-adapter) LoRA (`lora_delta`, `dora_slot`) first; the chunked cross-entropy
(`chunk_loss_and_grad`) and the SwiGLU + LoRA MLP middle (`swiglu_lora_fwd_ref` / `_bwd_ref`) of train/fast at the end.

The resident adapters of one linear layer are stacked into slot tensors:

    A_slots (S, r, in)    B_slots (S, out, r)     ranks zero-padded to a common r (zero rows of A /
                                                  columns of B add exactly nothing)

and every row of a batch names up to k slots with a coefficient each (a weighted stack is k > 1):

    idx (b, k) long       coef (b, k) float       coef = stack weight * the adapter's scale (alpha / r)

    delta[b] = sum_j coef[b, j] * (x[b] @ A_slots[idx[b, j]].T) @ B_slots[idx[b, j]].T

Per-token coefficients (a mixture of LoRAs: a router's gates, one set per token): coef may be (b, s, k),

    delta[b, t] = sum_j coef[b, t, j] * (x[b, t] @ A_slots[idx[b, j]].T) @ B_slots[idx[b, j]].T

the slots still chosen per row. A (b, k) coef is the same as that coef repeated over the s tokens. Only this
reference computes per-token coefficients: the dispatch (kernels/__init__.py) sends such calls here on every
device, the Triton kernels take (b, k) only.

An entry with idx = -1 or coef = 0 adds nothing (a row of such entries only is a base row; SlotBank
also keeps slot 0 all zeros for that). x, A_slots and B_slots share one dtype; delta has it too.
A weighted stack is computed as one low-rank product by concatenating ranks, so it is the exact
weighted sum of the adapters' weight changes (no cross terms).

DoRA, optional (`dora` and `base` given together). A DoRA adapter alone makes W' = g * (W + c B A)
row-wise, g = m / ||W + c B A||_row (out,). Stacked with weight w it adds w (W' - W) x, the rule of
core/layer.py (relative to the frozen W, so DoRA adapters stack independently of order). With

    dora (S, out)         zero for a plain LoRA slot; (g - 1) / c for a DoRA slot
    B_slots[slot]         g * B (rows scaled) for a DoRA slot        (both from `dora_slot`)
    base (b, s, out)      W x, the base layer's output without its bias

the row's extra output is delta[b] + (sum_j coef[b, j] * dora[idx[b, j]]) * base[b]:
coef * (g - 1) / c = w (g - 1), so this is exactly sum_j w_j ((g_j - 1) W x + g_j c B_j A_j x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_delta(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
               coef: torch.Tensor, dora: torch.Tensor | None = None, base: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x (b, s, in) -> delta (b, s, out); coef (b, k), or (b, s, k) per token. Gather each row's A/B, then two
    batched matmuls."""
    b, k = idx.shape
    r = A_slots.shape[1]
    per_token = coef.dim() == 3
    if coef.shape not in ((b, k), (b, x.shape[1], k)):
        raise ValueError(f"coef must be (b, k) = {(b, k)} or (b, s, k) = {(b, x.shape[1], k)}, got {tuple(coef.shape)}")
    live = (idx >= 0)[:, None, :] if per_token else idx >= 0
    cf = coef.float() * live  # (b, [s,] k); slot -1 adds nothing (no host sync: CUDA-graph safe)
    coef = cf.to(x.dtype)
    flat = idx.clamp(min=0).reshape(-1)
    A = A_slots.index_select(0, flat)  # (b*k, r, in)  (index_select: far cheaper than A_slots[idx] on CPU)
    B = B_slots.index_select(0, flat)  # (b*k, out, r)
    if k == 1:
        h = torch.bmm(x, A.transpose(1, 2))  # (b, s, r)
        out = torch.bmm(h, B.transpose(1, 2)) * (coef if per_token else coef[:, :, None])  # (b, s, out)
    else:
        A = A.reshape(b, k * r, -1)  # (b, k*r, in): the stack's ranks concatenated
        B = B.reshape(b, k, B.shape[1], r).permute(0, 2, 1, 3).reshape(b, B.shape[1], k * r)  # (b, out, k*r)
        h = torch.bmm(x, A.transpose(1, 2))  # (b, s, k*r)
        rank_coef = coef.repeat_interleave(r, dim=-1)  # each rank block times its coefficient
        h = h * (rank_coef if per_token else rank_coef[:, None, :])
        out = torch.bmm(h, B.transpose(1, 2))  # (b, s, out)
    if dora is None:
        return out
    if base is None or base.shape != out.shape:
        raise ValueError(f"DoRA needs base (W x) of shape {tuple(out.shape)}, got "
                         f"{None if base is None else tuple(base.shape)}")
    d = dora.index_select(0, flat).reshape(b, k, -1).float()  # (b, k, out)
    if per_token:
        gain = torch.bmm(cf, d)  # (b, s, out): per token sum_j w_j (g_j - 1)
        return out + (gain * base.float()).to(out.dtype)
    gain = (cf[:, :, None] * d).sum(1)  # (b, out): sum_j w_j (g_j - 1), in fp32
    return out + (gain[:, None, :] * base.float()).to(out.dtype)


def dora_slot(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float,
              coef_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a DoRA adapter's slot holds: W (out, in) base weight, A (r, in), B (out, r), magnitude (out,),
    scale its alpha / r -> (B to store (out, r), dora row (out,)), for coef = w * coef_scale (default scale)."""
    c = scale if coef_scale is None else coef_scale
    if c == 0:
        raise ValueError("coef_scale must be non-zero for a DoRA slot")
    g = magnitude.float() / torch.linalg.norm(W.float() + scale * (B.float() @ A.float()), dim=1)  # (out,)
    return (B.float() * (g * (scale / c))[:, None]).to(B.dtype), (g - 1) / c


def lora_delta_loop(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
                    coef: torch.Tensor) -> torch.Tensor:
    """The definition, row by row, slot by slot and (coef (b, s, k)) token by token (slow; for tests)."""
    out = torch.zeros(*x.shape[:2], B_slots.shape[1], dtype=x.dtype, device=x.device)  # (b, s, out)
    for row in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            s = int(idx[row, j])
            if s < 0:
                continue
            if coef.dim() == 2:
                out[row] += float(coef[row, j]) * (x[row] @ A_slots[s].T) @ B_slots[s].T
                continue
            for t in range(x.shape[1]):
                out[row, t] += float(coef[row, t, j]) * (x[row, t] @ A_slots[s].T) @ B_slots[s].T
    return out


# ---------------------------------------------------------------- train/fast: loss chunks and the LoRA MLP
def chunk_loss_and_grad(logits: Tensor, targets: Tensor, inv_n: Tensor, ignore_index: int
                        ) -> tuple[Tensor, Tensor]:
    """logits (c, V) model dtype, targets (c,) -> (summed loss over valid rows (fp32 scalar),
    d(mean loss)/d logits (c, V) in the logits' dtype)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))           # fp32 (fp64 stays)
    lse = torch.logsumexp(x, dim=-1)                                       # (c,)
    valid = targets != ignore_index                                         # (c,)
    t = torch.where(valid, targets, 0)                                      # (c,) safe to gather
    picked = x.gather(1, t[:, None]).squeeze(1)                             # (c,)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == t[:, None]  # (c, V)
    grad = (torch.exp(x - lse[:, None]) - onehot.to(x.dtype)) * inv_n       # (c, V)
    grad = torch.where(valid[:, None], grad, 0.0)
    return loss, grad.to(logits.dtype)


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
