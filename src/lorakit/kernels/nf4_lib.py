"""NF4 through a maintained 4-bit library: bitsandbytes (its quantize/dequantize kernels on lorakit's buffers, no
copy) or torchao (its NF4Tensor). The plain-torch reference is lorakit.core.nf4 (`dequantize_nf4`); this module
imports nothing from lorakit, core/nf4.py dispatches to it.

Libraries (`NF4Weight.lib`):
  own      lorakit's plain-torch code: the reference and the CPU path.
  bnb      bitsandbytes: the state IS bitsandbytes' NF4 state (core/nf4.py's module doc), so its kernels run on
           lorakit's buffers. Dequantization is bit-identical to the reference (tests/unit/test_nf4_lib.py on
           bitsandbytes' CPU kernels, tests/gpu/test_nf4_gpu.py on CUDA). Quantization runs through bitsandbytes
           too, so the state equals what transformers' BitsAndBytesConfig loads: the 4-bit codes equal the
           reference's; bitsandbytes' 8-bit absmax codes can be a neighbour of the exact nearest code that the
           reference takes (its CPU kernel looks codes up in an approximate table: ~5% of the absmax codes, one
           step of the dynamic map, <0.8% of that absmax; its CUDA kernel's binary search: rare, counted by the
           GPU test). Either state dequantizes identically in both implementations.
  torchao  torchao's NF4Tensor (QLoRA in torchtune): the same 4-bit codes (lorakit's), but torchao's own
           double quantization: the absmax less its mean as int8 in [-128, 127] with one factor 256/(2 max|.|)
           per 256 blocks, kept in the weight's dtype (bf16), and torchao's NF4 levels (4 decimals, in bf16);
           level * absmax is computed in bf16. Not bit-identical: |difference| is about 2^-8 of the weight.
           Needs numel divisible by 64 * 256 (every Llama projection is).
  auto     bnb on CUDA when bitsandbytes imports, else own.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger("lorakit.nf4")

LIBS = ("auto", "own", "bnb", "torchao")
BLOCK, SCALER_BLOCK = 64, 256


@functools.cache
def available(lib: str) -> bool:
    if lib == "own":
        return True
    name = {"bnb": "bitsandbytes", "torchao": "torchao"}.get(lib)
    return name is not None and importlib.util.find_spec(name) is not None


def resolve(lib: str | None, device: torch.device | str) -> str:
    """The library that stores and dequantizes a weight on `device`: `lib` (or $LORAKIT_NF4_LIB, default "auto")
    with "auto" decided. Raises ValueError for an unknown or missing library."""
    lib = lib or os.environ.get("LORAKIT_NF4_LIB", "auto")
    if lib not in LIBS:
        raise ValueError(f"unknown NF4 library {lib!r}; expected one of {list(LIBS)}")
    if lib == "auto":
        return "bnb" if torch.device(device).type == "cuda" and available("bnb") else "own"
    if not available(lib):
        pkg = {"bnb": "bitsandbytes", "torchao": "torchao"}[lib]
        raise ValueError(f"NF4 library {lib!r} asked for, but {pkg!r} is not installed (pip install {pkg})")
    return lib


# ---------------------------------------------------------------- bitsandbytes
def bnb_state(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_mean: torch.Tensor,
              shape: tuple[int, ...], dtype: torch.dtype):
    """bitsandbytes' QuantState over lorakit's buffers (views, no copy)."""
    import bitsandbytes.functional as bf

    dev = absmax_q.device
    state2 = bf.QuantState(absmax=absmax_scale, code=_bnb_dynamic(dev), blocksize=SCALER_BLOCK, dtype=torch.float32)
    return bf.QuantState(absmax=absmax_q, shape=torch.Size(shape), code=_bnb_nf4(dev), blocksize=BLOCK,
                         quant_type="nf4", dtype=dtype, offset=absmax_mean, state2=state2)


@functools.cache
def _bnb_dynamic(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.create_dynamic_map().to(device)


@functools.cache
def _bnb_nf4(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.get_4bit_type("nf4", device=device)


def bnb_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense weight -> lorakit's buffers, quantized by bitsandbytes' kernel for w's device."""
    import bitsandbytes.functional as bf

    packed, st = bf.quantize_4bit(w.detach().contiguous(), blocksize=BLOCK, compress_statistics=True,
                                  quant_type="nf4")
    return {"codes": packed.view(-1), "absmax_q": st.absmax, "absmax_scale": st.state2.absmax,
            "absmax_mean": st.offset.reshape(())}


def bnb_exact(shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether bitsandbytes dequantizes this shape on this device correctly. Its CPU kernel (0.50.2) cuts blocks per
    row: with an even last dimension that 64 does not divide, its own quantize/dequantize round trip is off (25%
    error instead of NF4's 9%, tests/unit/test_nf4_lib.py). CUDA's kernel blocks the flat weight."""
    return torch.device(device).type != "cpu" or shape[-1] % BLOCK == 0 or shape[-1] % 2 == 1


def bnb_dequantize(codes: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_mean: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit (one CUDA kernel for the codes, one for the absmax) -> (shape) in dtype."""
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(codes, bnb_state(absmax_q, absmax_scale, absmax_mean, shape, dtype))


# ---------------------------------------------------------------- torchao
def _ao():
    try:  # torchao >= 0.14
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs
    except ImportError:  # older releases
        from torchao.dtypes.nf4tensor import NF4Tensor, SubclassTensorArgs
    return NF4Tensor, SubclassTensorArgs


def torchao_state(w: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchao's double-quantized absmax of dense `w` (its own code), beside lorakit's 4-bit `codes`."""
    NF4Tensor, _ = _ao()
    if w.numel() % (BLOCK * SCALER_BLOCK):
        raise ValueError(f"torchao's NF4 needs a weight whose size divides {BLOCK * SCALER_BLOCK}; got "
                         f"{tuple(w.shape)} ({w.numel()} values)")
    scalers, factor, mean = NF4Tensor.double_quantize_scalers(w.detach().flatten(), BLOCK, SCALER_BLOCK)
    levels = NF4Tensor.from_tensor(torch.zeros(BLOCK * SCALER_BLOCK, dtype=w.dtype, device=w.device),
                                   BLOCK, SCALER_BLOCK).nf4  # torchao's level table, as it builds it
    return {"codes": codes, "ao_scalers": scalers, "ao_factor": factor, "ao_mean": mean.reshape(()),
            "ao_levels": levels}


def torchao_tensor(state: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype):
    """The NF4Tensor over the buffers (no copy)."""
    NF4Tensor, Args = _ao()
    stride = torch.empty(shape, device="meta").stride()
    meta = Args(torch.Size(shape), stride, 0, state["ao_factor"].dtype, state["codes"].device, False)
    return NF4Tensor(meta, BLOCK, state["codes"].numel() * 2 // BLOCK, SCALER_BLOCK, state["ao_scalers"],
                     state["ao_factor"], state["ao_mean"], state["codes"], state["ao_levels"])


def torchao_dequantize(state: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torchao's dequantization (NF4Tensor.get_original_weight: plain torch ops; compiled with
    $LORAKIT_TORCHAO_COMPILE=1, as torchtune runs it) -> (shape) in dtype."""
    fn = _compiled_ao() if os.environ.get("LORAKIT_TORCHAO_COMPILE") == "1" else _ao_original
    return fn(torchao_tensor(state, shape, dtype)).to(dtype)


def _ao_original(t) -> torch.Tensor:
    return t.get_original_weight()


@functools.cache
def _compiled_ao():
    return torch.compile(_ao_original, dynamic=False)
