"""Every hand-written kernel of lorakit lives here, beside its plain-torch reference (reference.py), and each op has
one dispatch below: the Triton kernel on CUDA where Triton is installed, the reference everywhere else. The server
(serve/slots.py, serve/decoder.py) and the fast training backend (train/fast) call these dispatches, never a
triton_*.py module.

  lora_delta(x, A_slots, B_slots, idx, coef[, dora, base])   per-row multi-adapter LoRA (serving): triton_lora.py
  lora_add(out, x, A_slots, B_slots, idx, coef)              the same added into out in place (decode): triton_lora.py
  lora_add_group(outs, x, As, Bs, idx, coef)                 lora_add for projections sharing an input (q/k/v,
                                                             gate/up), one token a row: triton_lora_group.py
  ce_chunk(logits, targets, inv_n, ignore_index)             a chunk's cross-entropy and its gradient, the
                                                             gradient written over the logits: triton_ce.py
  swiglu_lora_fwd / swiglu_lora_bwd                          the SwiGLU middle of a LoRA MLP: triton_mlp.py
  decode_attention (kernels/attention.py)                    the static-cache engine's decode step (windows,
                                                             soft-capped scores): triton_attn.py; beside it
                                                             dense_attention, transformers' attention maths
  NF4 dequantization (core/nf4.py)                           no hand kernel: plain torch (compiled with the layer),
                                                             or a 4-bit library through nf4_lib.py

Kernels must match their reference (tests/unit/test_kernels_triton.py and test_fast_mlp.py under the Triton
interpreter, tests/gpu on a GPU). Triton is imported on a kernel's first call, not here.

lora_delta: see `reference.py` for the exact contract and shapes; a faster implementation registers itself for a
device type in `IMPLS` (on CUDA with Triton, `triton_lora.lora_delta`: gather kernels for one token a row,
segmented kernels for longer rows). Per-token coefficients (coef (b, s, k), a mixture of LoRAs' gates) always run
the reference, on any device: the Triton kernels take one coefficient per row and slot.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels import reference

LoraDelta = Callable[..., torch.Tensor]

# device type ("cpu", "cuda", ...) -> implementation; anything absent uses the reference
IMPLS: dict[str, LoraDelta] = {}


def lora_delta(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
               coef: torch.Tensor, dora: torch.Tensor | None = None, base: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x (b, s, in), A_slots (S, r, in), B_slots (S, out, r), idx (b, k) long, coef (b, k) or per token
    (b, s, k) -> (b, s, out). Optional DoRA: dora (S, out) and base (b, s, out) = W x (see reference.py)."""
    impl = reference.lora_delta if coef.dim() == 3 else IMPLS.get(x.device.type, reference.lora_delta)
    if dora is None:
        return impl(x, A_slots, B_slots, idx, coef)
    return impl(x, A_slots, B_slots, idx, coef, dora=dora, base=base)


def lora_add(out: torch.Tensor, x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
             coef: torch.Tensor) -> torch.Tensor:
    """out += lora_delta(x, A_slots, B_slots, idx, coef) in place, coef (b, k); -> out (b, s, out). The Triton
    kernels add into out as they store (one pass, no separate add)."""
    rows_follow = out.stride(2) == 1 and out.stride(0) == out.shape[1] * out.stride(1)
    if x.device.type == "cuda" and "cuda" in IMPLS and coef.dim() == 2 and rows_follow:
        return IMPLS["cuda"](x, A_slots, B_slots, idx, coef, out=out)
    return out.add_(lora_delta(x, A_slots, B_slots, idx, coef))


def lora_add_group(outs: list[torch.Tensor], x: torch.Tensor, As: list[torch.Tensor], Bs: list[torch.Tensor],
                   idx: torch.Tensor, coef: torch.Tensor) -> list[torch.Tensor]:
    """For projections that read the same input x (T, in) or (T, 1, in), one token a row (q, k, v; gate, up):
    outs[g] (x's layout, out_g wide) += lora_delta of member g, coef (T, k). On CUDA with Triton one shrink and one
    expand launch for all members (triton_lora_group.py), through the custom op lorakit::lora_add_group (opaque to
    torch.compile: Inductor failed on the kernels' own call, bench/results/gpu_engine_log_h200_2026-12-06.txt);
    elsewhere lora_add per member."""
    grouped = x.device.type == "cuda" and "cuda" in IMPLS and coef.dim() == 2 and 2 <= len(outs) <= 3 and all(
        A.is_contiguous() and B.is_contiguous() and o.stride(-1) == 1 for o, A, B in zip(outs, As, Bs))
    if grouped:
        third = (As[2], Bs[2], outs[2]) if len(outs) == 3 else (None, None, None)
        _lora_add_group_op(x, idx, coef, As[0], Bs[0], outs[0], As[1], Bs[1], outs[1], *third)
        return outs
    _add_each(outs, x, As, Bs, idx, coef)
    return outs


def _add_each(outs, x, As, Bs, idx, coef) -> None:
    x3 = x if x.dim() == 3 else x[:, None]
    for o, A, B in zip(outs, As, Bs):
        o.add_(lora_delta(x3, A, B, idx, coef).view(o.shape))


@torch.library.custom_op("lorakit::lora_add_group", mutates_args=("o0", "o1", "o2"))
def _lora_add_group_op(x: Tensor, idx: Tensor, coef: Tensor, a0: Tensor, b0: Tensor, o0: Tensor, a1: Tensor,
                       b1: Tensor, o1: Tensor, a2: Tensor | None, b2: Tensor | None, o2: Tensor | None) -> None:
    members = [(a, b, o) for a, b, o in ((a0, b0, o0), (a1, b1, o1), (a2, b2, o2)) if o is not None]
    As, Bs, outs = (list(t) for t in zip(*members))
    if x.device.type == "cuda" and HAS_TRITON:
        from lorakit.kernels.triton_lora_group import lora_add_group as kernel

        kernel(outs, x, As, Bs, idx, coef)
    else:
        _add_each(outs, x, As, Bs, idx, coef)


@_lora_add_group_op.register_fake
def _(x, idx, coef, a0, b0, o0, a1, b1, o1, a2, b2, o2):
    return None


def _triton_cuda(*args, **kwargs) -> torch.Tensor:
    """The Triton kernels, imported on first use (importing Triton takes a while)."""
    from lorakit.kernels import triton_lora

    IMPLS["cuda"] = triton_lora.lora_delta
    return triton_lora.lora_delta(*args, **kwargs)


HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    IMPLS["cuda"] = _triton_cuda


# ---------------------------------------------------------------- cross-entropy of a chunk of logits
def ce_chunk(logits: Tensor, targets: Tensor, inv_n: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """logits (c, V), targets (c,) -> (summed loss over valid rows, d(mean loss)/d logits (c, V)). On CUDA with
    Triton the gradient is written over `logits` (no second (c, V) buffer); elsewhere the reference."""
    if logits.device.type == "cuda" and HAS_TRITON:
        from lorakit.kernels.triton_ce import ce_chunk_inplace

        return ce_chunk_inplace(logits, targets, inv_n, ignore_index)
    return reference.chunk_loss_and_grad(logits, targets, inv_n, ignore_index)


# ---------------------------------------------------------------- the SwiGLU + LoRA MLP middle (custom ops)
def triton_for(t: Tensor) -> bool:
    """Whether the SwiGLU kernels take `t`: a bf16/fp16 CUDA tensor, with Triton installed."""
    return HAS_TRITON and t.device.type == "cuda" and t.dtype in (torch.bfloat16, torch.float16)


def pad_rows(t: Tensor, n: int) -> Tensor:
    return t if t.shape[0] == n else F.pad(t, (0, 0, 0, n - t.shape[0]))


def pad_cols(t: Tensor, n: int) -> Tensor:
    return t.contiguous() if t.shape[1] == n else F.pad(t, (0, n - t.shape[1]))


def padded_rank(*ranks: int) -> int:
    """tl.dot needs every dimension >= 16: ranks are zero-padded to a multiple of 16."""
    return max(16, -(-max(ranks) // 16) * 16)


@torch.library.custom_op("lorakit::swiglu_lora_fwd", mutates_args=())
def swiglu_lora_fwd(y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    if not triton_for(y):
        return reference.swiglu_lora_fwd_ref(y, a)
    from lorakit.kernels.triton_mlp import swiglu_lora_fwd as kernel

    r = a.shape[0]
    h, ha = kernel(y.contiguous(), pad_rows(a.to(y.dtype), padded_rank(r)).contiguous())
    return h, ha[:, :r].clone()


@swiglu_lora_fwd.register_fake
def _(y, a):
    return y.new_empty(y.shape[0], y.shape[1] // 2), y.new_empty(y.shape[0], a.shape[0], dtype=torch.float32)


@torch.library.custom_op("lorakit::swiglu_lora_bwd", mutates_args=())
def swiglu_lora_bwd(y: Tensor, dhb: Tensor, dsha: Tensor, a: Tensor, sxa_g: Tensor, sxa_u: Tensor,
                    bg: Tensor, bu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not triton_for(y):
        return reference.swiglu_lora_bwd_ref(y, dhb, dsha, a, sxa_g, sxa_u, bg, bu)
    from lorakit.kernels.triton_mlp import swiglu_lora_bwd as kernel

    dt = y.dtype
    rd, rg, ru = a.shape[0], bg.shape[1], bu.shape[1]
    R = padded_rank(rd, rg, ru)
    sxa = torch.cat([pad_cols(sxa_g.to(dt), R), pad_cols(sxa_u.to(dt), R)], dim=-1)    # (T, 2R)
    dy, d_sxa, db, dat = kernel(y.contiguous(), dhb.contiguous(), pad_cols(dsha.to(dt), R),
                                pad_rows(a.to(dt), R).contiguous(), sxa,
                                pad_cols(bg.to(dt), R), pad_cols(bu.to(dt), R))
    d_sxa = torch.cat([d_sxa[:, :rg], d_sxa[:, R:R + ru]], dim=-1)
    # clones: outputs of a custom op may not alias each other (db[0] and db[1] share db's storage)
    return dy, d_sxa, db[0, :, :rg].clone(), db[1, :, :ru].clone(), dat[:, :rd].t().contiguous()


@swiglu_lora_bwd.register_fake
def _(y, dhb, dsha, a, sxa_g, sxa_u, bg, bu):
    f32 = torch.float32
    T, F2 = y.shape
    return (y.new_empty(T, F2), y.new_empty(T, bg.shape[1] + bu.shape[1], dtype=f32),
            y.new_empty(bg.shape, dtype=f32), y.new_empty(bu.shape, dtype=f32), y.new_empty(a.shape, dtype=f32))


__all__ = ["lora_delta", "lora_add", "lora_add_group", "IMPLS", "HAS_TRITON", "reference", "ce_chunk",
           "swiglu_lora_fwd", "swiglu_lora_bwd",
           "padded_rank", "pad_rows", "pad_cols", "triton_for"]
