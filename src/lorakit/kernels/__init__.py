"""Compute kernels behind one dispatch point.

`lora_delta(x, A_slots, B_slots, idx, coef[, dora, base])` is the per-row multi-adapter LoRA product
used by the server (see `reference.py` for the exact contract and shapes). The plain-torch reference
runs everywhere; a faster implementation registers itself for a device type in `IMPLS` and must match
the reference (tests/unit/test_kernels_triton.py under the Triton interpreter, tests/gpu on a GPU).
On CUDA with Triton installed, `IMPLS["cuda"]` is `triton_lora.lora_delta` (gather kernels for one
token a row, segmented kernels for longer rows); Triton is imported on the first call, not here.
Per-token coefficients (coef (b, s, k), a mixture of LoRAs' gates) always run the reference, on any device:
the Triton kernels take one coefficient per row and slot.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

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


def _triton_cuda(*args, **kwargs) -> torch.Tensor:
    """The Triton kernels, imported on first use (importing Triton takes a while)."""
    from lorakit.kernels import triton_lora

    IMPLS["cuda"] = triton_lora.lora_delta
    return triton_lora.lora_delta(*args, **kwargs)


if importlib.util.find_spec("triton") is not None:
    IMPLS["cuda"] = _triton_cuda

__all__ = ["lora_delta", "IMPLS", "reference"]
