"""QLoRA's base: linear weights held in 4-bit NF4 with double quantization, in plain torch.

Format (the QLoRA paper's, and byte for byte the state bitsandbytes' `quantize_4bit(..., quant_type="nf4",
compress_statistics=True)` produces, so a weight moves between lorakit and bitsandbytes without re-quantizing):
  - the weight is flattened and cut into blocks of 64; each block is multiplied by 1/absmax and every value is
    replaced by the index of the nearest of the 16 NF4 levels (quantiles of N(0, 1), scaled to [-1, 1]; a value
    exactly half-way between two levels takes the lower one); two indices are packed per byte, the first in the
    high nibble (ceil(n/2) bytes);
  - double quantization: the fp32 absmax constants (one per 64 values) lose their mean and are quantized in
    blocks of 256 to 8-bit indices into bitsandbytes' signed dynamic map (`dynamic_map()`), each block with one
    fp32 absmax; the mean is kept in fp32.
  Storage per weight: 4 bits + 8/64 + 32/(64*256) bits = 4.127 bits (fp32 is 32, bf16 16).
  Shapes need not divide 64 or 256: the last block is shorter, as in bitsandbytes.
  Dequantized values equal bitsandbytes' `dequantize_4bit` bit for bit (the same fp32 products in the same
  order, then one rounding to the compute dtype); quantizing gives the same state on the same device (the fp32
  mean of the absmax is a reduction: between CPU and CUDA it may differ in its last bit). Before this format
  lorakit kept the absmax as linear int8 (absmax/127 steps); that state is not read any more (the 4-bit base is
  always made from the dense checkpoint at load time).

Where the dequantization runs (`NF4Weight.lib`, lorakit.kernels.nf4_lib): on CUDA through bitsandbytes' kernel
when bitsandbytes is installed ("bnb"), else this module's plain-torch code ("own", the reference, and the CPU
path); "torchao" stores torchao's NF4Tensor format instead (for measuring it; not bit-identical, see nf4_lib).
The matmul dequantizes on the fly (forward and again in backward, so no dense weight is kept for autograd), in
the activations' dtype. See docs/variants.md and docs/gpu.md (round 5).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.targets import WRAPPERS as LORA_WRAPPERS, find_targets
from lorakit.core.layer import LoraLinear
from lorakit.core.state import state_of
from lorakit.core.qlora import qlora_linear
from lorakit.kernels import nf4_lib

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
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """(256,) fp32, sorted: bitsandbytes' signed 8-bit dynamic map (Dettmers 2015), the code book of the absmax
    double quantization. For e = 0..6: the 2^e midpoints of linspace(0.1, 1, 2^e + 1) times 10^(e-6), with both
    signs (254 values), plus 0 and 1."""
    key = torch.device(device)
    if key not in _DYNAMIC:
        vals: list[float] = []
        for e in range(7):
            edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            vals += ((10 ** (e - 6)) * mids).tolist() + ((-(10 ** (e - 6))) * mids).tolist()
        _DYNAMIC[key] = torch.tensor(sorted(vals + [0.0, 1.0]), dtype=torch.float32, device=key)
    return _DYNAMIC[key]


_DYNAMIC: dict[torch.device, torch.Tensor] = {}


def _blockwise_normalize(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (n,) fp32 -> (absmax (nb,), flat * (1/absmax of its block) clamped to [-1, 1], (n,)). The last block
    may be shorter. Multiplying by the reciprocal (not dividing) is what bitsandbytes' kernels do."""
    n = flat.numel()
    nb = -(-n // block)
    blocks = F.pad(flat, (0, nb * block - n)).view(nb, block)             # zeros change no absmax
    absmax = blocks.abs().amax(dim=1)                                      # (nb,)
    inv = 1.0 / absmax.clamp_min(1e-38)
    return absmax, (blocks * inv[:, None]).clamp(-1, 1).flatten()[:n]


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` book; exactly half-way goes to the lower one. uint8."""
    return torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)


@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense weight -> {codes uint8 (ceil(n/2),), absmax_q uint8 (nb,), absmax_scale fp32 (ns,), absmax_mean fp32 ()}
    with nb = ceil(n/64), ns = ceil(nb/256): bitsandbytes' NF4 state (module doc)."""
    check_platform(w.device, w.dtype)
    flat = w.detach().reshape(-1).float()
    absmax, normed = _blockwise_normalize(flat, BLOCK)
    if normed.numel() % 2:
        normed = F.pad(normed, (0, 1))                                     # a zero: the last byte's low nibble
    idx = _nearest(normed, torch.tensor(NF4_LEVELS, device=w.device))
    return {"codes": (idx[0::2] << 4) | idx[1::2], **_double_quantize(absmax)}


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = absmax.mean()
    scale, normed = _blockwise_normalize(absmax - mean, SCALER_BLOCK)     # (ns,), (nb,)
    return {"absmax_q": _nearest(normed, dynamic_map(absmax.device)), "absmax_scale": scale, "absmax_mean": mean}


def dequantize_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(nb,) fp32: the 64-value blocks' absmax as the double quantization keeps them (code * scale, + mean)."""
    q = state["absmax_q"]
    nb, ns = q.numel(), state["absmax_scale"].numel()
    vals = F.pad(dynamic_map(q.device)[q.long()], (0, ns * SCALER_BLOCK - nb)).view(ns, SCALER_BLOCK)
    return (vals * state["absmax_scale"][:, None]).flatten()[:nb] + state["absmax_mean"]


def dequantize_nf4(state: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The plain-torch reference: level * absmax in fp32, rounded once to `dtype`."""
    absmax = dequantize_absmax(state)                                      # (nb,)
    nb, n = absmax.numel(), torch.Size(shape).numel()
    vals = _byte_table(state["codes"].device)[state["codes"].long()].flatten()  # (2*ceil(n/2),) levels
    vals = F.pad(vals, (0, nb * BLOCK - vals.numel())).view(nb, BLOCK)
    return (vals * absmax[:, None]).flatten()[:n].view(shape).to(dtype)


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
    """A 4-bit weight: the quantized state as buffers (moved by .to(), in the state dict). `lib` (module doc,
    lorakit.kernels.nf4_lib): which implementation quantizes and dequantizes it; None reads $LORAKIT_NF4_LIB
    (default "auto": bitsandbytes on CUDA where it is installed, this module's plain torch otherwise)."""

    def __init__(self, w: torch.Tensor | None = None, lib: str | None = None, *,
                 state: dict[str, torch.Tensor] | None = None, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if state is not None:  # an existing state (bitsandbytes', or a saved one): no quantization
            self.shape, self.dtype, self.lib = tuple(shape), dtype, lib or "auto"
            nf4_lib.resolve(self.lib, state["codes"].device)
        else:
            self.shape, self.dtype = tuple(w.shape), w.dtype
            self.lib = lib or os.environ.get("LORAKIT_NF4_LIB", "auto")
            use = nf4_lib.resolve(self.lib, w.device)
            state = nf4_lib.bnb_quantize(w) if use == "bnb" else quantize_nf4(w)
            if use == "torchao":
                state = nf4_lib.torchao_state(w, state["codes"])
        for k, t in state.items():
            self.register_buffer(k, t)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state, lib: str | None = None) -> "NF4Weight":
        """A bitsandbytes NF4 weight (Params4bit data and its QuantState, double-quantized, blocks of 64) as
        lorakit's, sharing its tensors."""
        qs = quant_state
        if qs.quant_type != "nf4" or qs.blocksize != BLOCK or not qs.nested or qs.state2.blocksize != SCALER_BLOCK:
            raise ValueError(f"expected bitsandbytes NF4 with double quantization and blocks of {BLOCK}; got "
                             f"{qs.quant_type}, blocks of {qs.blocksize}, nested={qs.nested}")
        state = {"codes": packed.view(-1), "absmax_q": qs.absmax, "absmax_scale": qs.state2.absmax,
                 "absmax_mean": qs.offset.reshape(())}
        return cls(state=state, shape=tuple(qs.shape), dtype=qs.dtype, lib=lib)

    def to_bnb(self):
        """-> (packed (n/2, 1) uint8, bitsandbytes QuantState), views of this weight's buffers."""
        if self.lib == "torchao":
            raise ValueError("a torchao-format NF4 weight has no bitsandbytes state; quantize with lib='bnb'")
        b = self.state()
        return b["codes"].view(-1, 1), nf4_lib.bnb_state(b["absmax_q"], b["absmax_scale"], b["absmax_mean"],
                                                         self.shape, self.dtype)

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the state; model.to(dtype) changes only the compute dtype: the quantized
        state keeps its dtypes (fp32 scales stay fp32, the 4-bit codes stay codes)."""
        probe = fn(torch.zeros((), dtype=self.dtype))
        kept = {k: t.dtype for k, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for k, dt in kept.items():
            if self._buffers[k].dtype != dt:
                self._buffers[k] = self._buffers[k].to(dt)
        self.dtype = probe.dtype if probe.is_floating_point() else self.dtype
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """The quantized state by name (core/nf4_shard.FlatNF4Weight keeps it in one flat parameter)."""
        return self._buffers

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype, b = dtype or self.dtype, self.state()
        if self.lib == "torchao":
            return nf4_lib.torchao_dequantize(b, self.shape, dtype)
        dev = b["codes"].device
        if nf4_lib.resolve(self.lib, dev) == "bnb" and nf4_lib.bnb_exact(self.shape, dev):
            return nf4_lib.bnb_dequantize(b["codes"], b["absmax_q"], b["absmax_scale"], b["absmax_mean"],
                                          self.shape, dtype)
        return dequantize_nf4(b, torch.Size(self.shape), dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def represented_params(self) -> int:
        """The frozen weight's parameter count (its buffers are codes and scales, not parameters)."""
        return math.prod(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4 double-quant ({self.lib}), {self.nbytes():,} bytes"


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
    def from_linear(cls, lin: nn.Linear, lib: str | None = None) -> "NF4Linear":
        return cls(NF4Weight(lin.weight, lib), lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)


class LoraNF4Linear(LoraLinear):
    """LoRA on a 4-bit base (QLoRA): the adapters stay in the compute dtype, the base is dequantized
    on the fly. Merging is refused: re-quantizing W + dW to 4 bits would not be exact."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def base_weight(self) -> torch.Tensor:
        return self.weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One active plain-LoRA adapter (the QLoRA training case): core/qlora.py's single autograd step.
        Anything else (several adapters, DoRA, routing): LoraLinear's general path."""
        if self.routing is None and len(self.active) == 1:
            name, w = next(iter(self.active.items()))
            p = self.adapters[name] if name in self.adapters else None
            if p is not None and p.lora_magnitude_vector is None:
                xd = x if isinstance(p.dropout, nn.Identity) else p.dropout(x)
                return qlora_linear(x, xd, p.lora_A, p.lora_B, self.weight, self.bias, p.scale * w)
        return super().forward(x)

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
def quantize_model(model: nn.Module, targets: list[str] | str = "all-linear", quant: str = "nf4",
                   lib: str | None = None) -> dict:
    """Replace the selected nn.Linear modules with 4-bit NF4 ones, in place. "all-linear" keeps the
    output head in full precision (as QLoRA does). Call before adding adapters. `lib`: see NF4Weight.
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
    nf4_lib.resolve(lib, next(model.parameters()).device)  # an unknown or missing library fails here
    dense = packed = 0
    for path in paths:
        lin = model.get_submodule(path)
        q = NF4Linear.from_linear(lin, lib)
        dense += lin.weight.numel() * lin.weight.element_size()
        packed += q.weight.nbytes()
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    state_of(model).quant = quant
    return {"modules": len(paths), "dense_bytes": dense, "quant_bytes": packed}


def from_bitsandbytes(model: nn.Module, lib: str | None = None) -> dict:
    """Replace bitsandbytes' 4-bit linears (Linear4bit, as transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) loads them) by lorakit's NF4Linear, sharing their
    state: no re-quantization, the same values bit for bit. -> {"modules": n}."""
    paths = [path for path, mod in model.named_modules()
             if getattr(getattr(mod, "weight", None), "quant_state", None) is not None and hasattr(mod, "out_features")]
    for path in paths:
        mod = model.get_submodule(path)
        qw = NF4Weight.from_bnb(mod.weight.data, mod.weight.quant_state, lib)
        qw.dtype = getattr(mod, "compute_dtype", None) or qw.dtype
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, NF4Linear(qw, mod.bias))
    if paths:
        state_of(model).quant = "nf4"
    return {"modules": len(paths)}


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
