"""NF4 dequantization in one pass on the GPU (Triton): 4-bit codes and per-block absmax in, the dense weight out.

The plain-torch path (core/nf4.py) gathers the levels through a long-index table lookup into an fp32 tensor
of the whole weight, multiplies it by the absmax and casts: four kernels and ~6 bytes of temporaries per
value. Here each output value reads its byte, picks its nibble's level, multiplies it by its block's absmax in
fp32 and rounds once to the output dtype: the same arithmetic (fp32 product, one rounding), so the result is
bit for bit the reference's (tests/gpu/test_kernels_gpu.py), with no temporaries beside the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # values a program writes


@triton.jit
def _nf4_dequant(codes_ptr, absmax_ptr, levels_ptr, out_ptr, n, BLOCK_VALUES: tl.constexpr,
                 TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)  # the high nibble holds the even value
    level = tl.load(levels_ptr + nibble, mask=mask, other=0.0)
    absmax = tl.load(absmax_ptr + offs // BLOCK_VALUES, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (level * absmax).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, n: int, block: int,
               dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 (ceil(n/2),), absmax fp32 (n/block blocks,), levels fp32 (16,) -> (n,) in `dtype`."""
    out = torch.empty(n, dtype=dtype, device=codes.device)
    _nf4_dequant[(triton.cdiv(n, TILE),)](codes, absmax.float().contiguous(), levels, out, n,
                                          BLOCK_VALUES=block, TILE=TILE)
    return out
