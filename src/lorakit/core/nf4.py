"""QLoRA's base: linear weights held in 4-bit NF4 with double quantization, in plain torch.

Format (the QLoRA paper's, bit-for-bit the 4-bit codes bitsandbytes produces):
  - the weight is flattened and cut into blocks of 64; each block is divided by its absmax and every
    value is replaced by the index of the nearest of the 16 NF4 levels (quantiles of N(0, 1), scaled
    to [-1, 1]); two indices are packed per byte, the first in the high nibble;
  - double quantization: the fp32 absmax constants (one per 64 values) lose their mean and are
    quantized to int8 in blocks of 256, each with one fp32 scale; the mean is kept in fp32.
  Storage per weight: 4 bits + 8/64 + 32/(64*256) bits = 4.127 bits (fp32 is 32, bf16 16).
  Shapes need not divide 64 or 256: the tail is zero-padded and cut off again on dequantization.

The matmul dequantizes on the fly (forward and again in backward, so no dense weight is kept for
autograd), in the activations' dtype. Why plain torch rather than bitsandbytes or torchao: it runs
unchanged on CPU and CUDA with no native dependency (CI is CPU-only, the GPU machine has neither
library), and the format is small enough to verify against bitsandbytes directly
(tests/unit/test_quant.py). See docs/variants.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.targets import WRAPPERS as LORA_WRAPPERS, find_targets
from lorakit.core.layer import LoraLinear
from lorakit.core.state import state_of

BLOCK = 64  # values per absmax constant
SCALER_BLOCK = 256  # absmax constants per fp32 scale (double quantization)
QUANT_TYPES = ("nf4",)
DEVICES = ("cpu", "cuda")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild the 16 levels from their definition: 8 positive and 7 negative quantiles of N(0, 1)
    between `offset` and 0.5, plus an exact zero, divided by the largest (QLoRA, section 3)."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.max()


def check_platform(device: torch.device | str, dtype: torch.dtype, quant: str = "nf4") -> None:
    """Raise ValueError naming what is unsupported: the quant type, the device, or the compute dtype."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {quant!r}; lorakit supports {list(QUANT_TYPES)}")
    dev = torch.device(device)
    if dev.type not in DEVICES:
        raise ValueError(f"4-bit NF4 base weights run on {list(DEVICES)} only; got device {str(dev)!r}")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"4-bit NF4 needs a float32, bfloat16 or float16 base weight to quantize; got {dtype}")


# ---------------------------------------------------------------- the format
@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense weight -> {codes uint8 (n/2,), absmax_q int8 (nb,), absmax_scale fp32 (ns,), absmax_mean fp32 ()}."""
    check_platform(w.device, w.dtype)
    flat = w.detach().float().flatten()
    nb = -(-flat.numel() // BLOCK)
    blocks = F.pad(flat, (0, nb * BLOCK - flat.numel())).view(nb, BLOCK)  # (nb, 64)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    idx = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()  # ties go down
    codes = (idx[0::2] << 4) | idx[1::2]  # (nb*32,)
    return {"codes": codes, **_double_quantize(absmax)}


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = absmax.mean()
    ns = -(-absmax.numel() // SCALER_BLOCK)
    c = F.pad(absmax - mean, (0, ns * SCALER_BLOCK - absmax.numel())).view(ns, SCALER_BLOCK)  # (ns, 256)
    scale = c.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # (ns,)
    q = torch.round(c / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[: absmax.numel()]
    return {"absmax_q": q, "absmax_scale": scale, "absmax_mean": mean}


def dequantize_nf4(state: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    codes, q = state["codes"], state["absmax_q"]
    pairs = _byte_table(codes.device)[codes.long()]  # (n/2, 2) fp32: high nibble's level, low nibble's
    scale = state["absmax_scale"].repeat_interleave(SCALER_BLOCK)[: q.numel()]  # (nb,)
    absmax = q.float() * scale + state["absmax_mean"]  # (nb,)
    n = torch.Size(shape).numel()
    w = (pairs.view(q.numel(), BLOCK) * absmax[:, None]).flatten()[:n]
    return w.view(shape).to(dtype)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2): byte -> the two levels it packs."""
    if device not in _TABLES:
        levels = torch.tensor(NF4_LEVELS)
        b = torch.arange(256)
        _TABLES[device] = torch.stack([levels[b >> 4], levels[b & 15]], dim=1).to(device)
    return _TABLES[device]


# ---------------------------------------------------------------- modules
class NF4Weight(nn.Module):
    """A 4-bit weight: the quantized state as buffers (moved by .to(), in the state dict)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.shape, self.dtype = tuple(w.shape), w.dtype
        for k, t in quantize_nf4(w).items():
            self.register_buffer(k, t)

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the state; model.to(dtype) changes only the compute dtype: the fp32
        absmax scale and mean stay fp32 (and the 4-bit codes stay codes)."""
        probe = fn(torch.zeros((), dtype=self.dtype))
        super()._apply(fn, recurse)
        for k in ("absmax_scale", "absmax_mean"):
            self._buffers[k] = self._buffers[k].float()
        self.dtype = probe.dtype if probe.is_floating_point() else self.dtype
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(dict(self.named_buffers()), torch.Size(self.shape), dtype or self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def represented_params(self) -> int:
        """The frozen weight's parameter count (its buffers are codes and scales, not parameters)."""
        return math.prod(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4 double-quant, {self.nbytes():,} bytes"


class _DequantLinear(torch.autograd.Function):
    """x @ W.T + b with W dequantized in forward and again in backward: autograd keeps no dense W."""

    @staticmethod
    def forward(ctx, x, qweight: NF4Weight, bias):
        ctx.qweight = qweight
        return F.linear(x, qweight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        gx = grad @ ctx.qweight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None


def nf4_linear(x: torch.Tensor, qweight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        bias = bias.to(x.dtype)
    return _DequantLinear.apply(x, qweight, bias)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is 4-bit NF4 (the bias stays in its dtype)."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "NF4Linear":
        return cls(NF4Weight(lin.weight), lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)


class LoraNF4Linear(LoraLinear):
    """LoRA on a 4-bit base (QLoRA): the adapters stay in the compute dtype, the base is dequantized
    on the fly. Merging is refused: re-quantizing W + dW to 4 bits would not be exact."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def base_weight(self) -> torch.Tensor:
        return self.weight.dequantize()

    def merge(self, names: list[str] | None = None, keep_original: bool = True) -> None:
        raise ValueError("cannot merge an adapter into a 4-bit NF4 base: re-quantizing W + dW is lossy, not "
                         "exact; load the adapter on the full-precision base to merge it, or run "
                         "lorakit.core.nf4.dequantize_model(model) first")

    def unmerge(self) -> None:
        pass  # never merged

    def to_base(self) -> nn.Module:
        return NF4Linear(self.weight, self.bias)


WRAPPERS: dict[type, type[LoraLinear]] = {NF4Linear: LoraNF4Linear}
LORA_WRAPPERS.update(WRAPPERS)  # add_adapter can now wrap 4-bit linears


# ---------------------------------------------------------------- model-level
def quantize_model(model: nn.Module, targets: list[str] | str = "all-linear", quant: str = "nf4") -> dict:
    """Replace the selected nn.Linear modules with 4-bit NF4 ones, in place. "all-linear" keeps the
    output head in full precision (as QLoRA does). Call before adding adapters.
    -> {"modules": n, "dense_bytes": ..., "quant_bytes": ...} for the replaced weights."""
    paths = find_targets(model, targets)
    for path in paths:  # check everything before changing anything
        mod = model.get_submodule(path)
        if isinstance(mod, (NF4Linear, LoraNF4Linear)):
            raise ValueError(f"module {path!r} is already 4-bit")
        if type(mod) is not nn.Linear:
            raise ValueError(f"module {path!r} is a {type(mod).__name__}; 4-bit NF4 quantizes plain nn.Linear "
                             f"modules only (quantize before adding adapters)")
        check_platform(mod.weight.device, mod.weight.dtype, quant)
    dense = packed = 0
    for path in paths:
        lin = model.get_submodule(path)
        q = NF4Linear.from_linear(lin)
        dense += lin.weight.numel() * lin.weight.element_size()
        packed += q.weight.nbytes()
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    state_of(model).quant = quant
    return {"modules": len(paths), "dense_bytes": dense, "quant_bytes": packed}


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Put dense nn.Linear modules back (holding the 4-bit values, dequantized), in place."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, LoraNF4Linear):
            raise ValueError(f"module {path!r} carries adapters on a 4-bit base; save them, dequantize the bare "
                             f"model, and load them again")
        if isinstance(mod, NF4Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.weight.dequantize(), requires_grad=False)
            lin.bias = mod.bias
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, lin)
    state_of(model).quant = None
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's tensors, split into 4-bit state and everything else (tied counted once)."""
    seen, quant, other = set(), 0, 0
    for mod in model.modules():
        is_q = isinstance(mod, NF4Weight)
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            n = t.numel() * t.element_size()
            quant, other = (quant + n, other) if is_q else (quant, other + n)
    return {"quant_bytes": quant, "other_bytes": other, "total_bytes": quant + other}
