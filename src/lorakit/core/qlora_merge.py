"""What a user does with a QLoRA adapter next: merge it into a dense copy of the base it was trained on.

The adapter learned against the dequantized 4-bit weights, so the merged weight is
    round_dtype( dequant_fp32(W4) + sum_i w_i * s_i * B_i @ A_i )        (one rounding, at the end)
with the NF4 weight dequantized to float32 (the levels times the double-quantized absmax, fp32 products) and the
deltas added in float32 (LoraLinear.merge's sum). The result equals the 4-bit model with the adapter up to that
one rounding of the weights: the merged model's logits are the 4-bit model + adapter's within what rounding the
weights to `dtype` moves them (tests/unit/test_qlora_merge.py derives the bound).

Merging onto the original full-precision checkpoint instead (lorakit merge --base-quant none) gives a different
model: the adapter then meets the weights it never saw (docs/variants.md measures the difference).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.core.inject import unload
from lorakit.core.layer import LoraLinear
from lorakit.core.nf4 import LoraNF4Linear, NF4Linear
from lorakit.core.state import state_of


def _dense_linear(mod: nn.Module) -> nn.Linear:
    """An nn.Linear holding `mod`'s 4-bit weight dequantized to float32 (its bias as it is)."""
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(mod.weight.dequantize(torch.float32), requires_grad=False)  # (out, in) fp32
    lin.bias = mod.bias
    return lin


@torch.no_grad()
def dequantize_fp32(model: nn.Module) -> int:
    """Give every 4-bit linear a dense float32 weight holding its dequantized values, in place: NF4Linear becomes
    nn.Linear, LoraNF4Linear a LoraLinear carrying the same adapters (the same modules, the same active weights).
    -> the number of layers changed."""
    n = 0
    for path, mod in list(model.named_modules()):
        if isinstance(mod, LoraNF4Linear):
            new = LoraLinear(_dense_linear(mod))
            new.adapters, new.active, new.routing = mod.adapters, dict(mod.active), mod.routing
            new.tied_with = list(mod.tied_with)
        elif isinstance(mod, NF4Linear):
            new = _dense_linear(mod)
        else:
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        n += 1
    state_of(model).quant = None
    return n


@torch.no_grad()
def merge_qlora(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Merge the active adapters of a model with a 4-bit base into a dense `dtype` model, in place: dequantize to
    float32, add the deltas in float32, round every weight to `dtype` once. Returns the model (plain modules)."""
    if not dtype.is_floating_point:
        raise ValueError(f"merge_qlora writes a floating-point model; got dtype {dtype}")
    n = dequantize_fp32(model)
    if n == 0:
        raise ValueError("merge_qlora: the model has no 4-bit layer; merge a full-precision base with "
                         "lorakit.core.inject.unload(model, merge_active=True)")
    unload(model, merge_active=True)  # fp32 + fp32 delta, kept in fp32 (no rounding yet)
    return model.to(dtype)
