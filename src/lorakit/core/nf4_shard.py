"""A 4-bit (NF4) base that FSDP2 can shard: each weight's quantized state as ONE flat, frozen nn.Parameter.

FSDP2 (`fully_shard`) shards a module's parameters, not its buffers, and splits every parameter along dim 0.
`NF4Weight` keeps its state as four buffers of three dtypes (codes and absmax codes uint8, the scales fp32, one of
them a scalar), so under FSDP every rank would hold all of it. `FlatNF4Weight` holds the same bytes laid end to end
in one 1-D parameter (requires_grad False): FSDP cuts it into one chunk a rank and all-gathers it, with the layer's
other weights, just before the layer runs (forward, and again for backward); dequantization reads the gathered
bytes through views, so the values are those of the NF4Weight bit for bit.

The storage dtype: the bytes viewed as `storage` (default: the weight's compute dtype, so that a layer's units
hold one dtype, as the field does: bitsandbytes' `bnb_4bit_quant_storage=torch.bfloat16` in Answer.AI's FSDP +
QLoRA, torchao's NF4Tensor shown to FSDP as its bf16 parameter). FSDP2 all-gathers mixed dtypes too (as bytes), so
uint8 works as well. The bytes are never cast: `model.to(dtype)` changes the compute dtype only and `.to(device)`
moves them unchanged. A mixed-precision policy that casts parameters must not be applied to them.

Layout: each state tensor's bytes start at a multiple of ALIGN (so views as fp32 are aligned), the total rounded
up to ALIGN; `layout` records (name, dtype, shape, byte offset, byte count).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.core.nf4 import NF4Weight

ALIGN = 16  # bytes


def pack_state(state: dict[str, torch.Tensor], storage: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """-> (flat (n,) `storage`, layout) holding every tensor of `state` byte for byte."""
    size = torch.empty((), dtype=storage).element_size()
    layout, off = [], 0
    for name, t in state.items():
        off = -(-off // ALIGN) * ALIGN
        n = t.numel() * t.element_size()
        layout.append((name, t.dtype, tuple(t.shape), off, n))
        off += n
    total = -(-off // max(ALIGN, size)) * max(ALIGN, size)
    dev = next(iter(state.values())).device
    buf = torch.zeros(total, dtype=torch.uint8, device=dev)
    if dev.type != "meta":
        for (name, _, _, o, n) in layout:
            buf[o:o + n] = state[name].detach().contiguous().reshape(-1).view(torch.uint8)
    return buf.view(storage), tuple(layout)


def unpack_state(flat: torch.Tensor, layout: tuple) -> dict[str, torch.Tensor]:
    """Views of `flat`'s bytes as the state tensors (a copy only where the bytes are not aligned for the view)."""
    b = flat.reshape(-1).view(torch.uint8)
    out = {}
    for name, dtype, shape, o, n in layout:
        part = b[o:o + n]
        try:
            out[name] = part.view(dtype).view(shape)
        except RuntimeError:  # storage offset not a multiple of the element size
            out[name] = part.clone().view(dtype).view(shape)
    return out


class FlatNF4Weight(NF4Weight):
    """An NF4Weight whose state is one flat frozen parameter, `flat` (module doc). Reads like its source:
    `dequantize`, `to_bnb`, `nbytes`, `represented_params`."""

    def __init__(self, src: NF4Weight, storage: torch.dtype | None = None):
        state = {k: t for k, t in src._buffers.items() if t is not None}
        super().__init__(state=state, shape=src.shape, dtype=src.dtype, lib=src.lib)
        for k in state:
            del self._buffers[k]
        flat, self.layout = pack_state(state, storage or src.dtype)
        self.flat = nn.Parameter(flat, requires_grad=False)

    def state(self) -> dict[str, torch.Tensor]:
        return unpack_state(self.flat, self.layout)

    def _apply(self, fn, recurse=True):
        """Device moves only: the stored bytes keep their dtype and bits; a float dtype becomes the compute dtype."""
        probe = fn(torch.zeros((), dtype=self.dtype))
        flat = self._parameters["flat"]
        if flat.device != probe.device:
            with torch.no_grad():
                data = torch.empty_like(flat, device=probe.device) if flat.is_meta else flat.to(probe.device)
            self._parameters["flat"] = nn.Parameter(data, requires_grad=False)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def nbytes(self) -> int:
        return sum(n for *_, n in self.layout)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", flat {self.flat.dtype} storage"


def flatten_nf4(model: nn.Module, storage: torch.dtype | None = None) -> int:
    """Give every 4-bit linear of `model` a FlatNF4Weight (same bytes, one parameter), in place; -> how many.
    Call before `fully_shard` (and after adding adapters or before: the LoRA wrapper keeps the base's weight)."""
    n = 0
    for mod in list(model.modules()):
        w = getattr(mod, "weight", None)
        if isinstance(w, NF4Weight) and not isinstance(w, FlatNF4Weight):
            if w.lib == "torchao":
                raise ValueError("a torchao-format NF4 weight cannot be flattened for FSDP; quantize with "
                                 "LORAKIT_NF4_LIB=own or bnb")
            mod.weight = FlatNF4Weight(w, storage)
            n += 1
    return n
