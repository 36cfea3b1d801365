"""Compute kernels behind one dispatch point.

`lora_delta(x, A_slots, B_slots, idx, coef)` is the per-row multi-adapter LoRA product used by the
server (see `reference.py` for the exact contract and shapes). The plain-torch reference runs
everywhere; a faster implementation (a Triton/CUDA SGMV-style kernel) registers itself for a
device type in `IMPLS` and must match the reference in tests/unit/test_kernels*.py.
"""
from __future__ import annotations

from typing import Callable

import torch

from lorakit.kernels import reference

LoraDelta = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# device type ("cpu", "cuda", ...) -> implementation; anything absent uses the reference
IMPLS: dict[str, LoraDelta] = {}


def lora_delta(x: torch.Tensor, A_slots: torch.Tensor, B_slots: torch.Tensor, idx: torch.Tensor,
               coef: torch.Tensor) -> torch.Tensor:
    """x (b, s, in), A_slots (S, r, in), B_slots (S, out, r), idx (b, k) long, coef (b, k) -> (b, s, out)."""
    impl = IMPLS.get(x.device.type, reference.lora_delta)
    return impl(x, A_slots, B_slots, idx, coef)


__all__ = ["lora_delta", "IMPLS", "reference"]
