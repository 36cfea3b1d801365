"""Document masks for packed rows (train/data.py `pack`): attention causal within each row, never across rows.

On CUDA the mask is a FlexAttention BlockMask built straight from the rows' boundaries (no (s, s) tensor):
blocks of 128 x 128 (query, key) positions are empty (no work), full (every query sees every key: below the
diagonal, one row) or partial (the mask function decides per position). Elsewhere (CPU, or no FlexAttention)
it is a boolean (1, 1, s, s) mask for SDPA, which costs s x s booleans and the dense attention's work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lorakit.train.data import doc_ids

BLOCK = 128


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def dense_doc_mask(seq_lens, device=None) -> Tensor:
    """Segment lengths -> (1, 1, s, s) bool: query i sees key j iff same segment and j <= i."""
    doc = doc_ids(seq_lens, device)                                       # (s,)
    s = doc.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, None] == doc[None, :]) & causal)[None, None]


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(nq, nk) bool -> (counts (1, 1, nq) int32, indices (1, 1, nq, nk) int32 with the True columns first)."""
    counts = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], idx[None, None]


class DocMasks:
    """Document masks for packed rows, one FlexAttention mask function per (width, device): a compiled graph
    guards on the identity of the mask function it was traced with, so the function stays the same object and
    the segment ids it reads live in a buffer rewritten in place each step (stream order keeps the previous
    step's backward reading the old ids before they change)."""

    def __init__(self, use_flex: bool):
        self.use_flex = use_flex
        self._fns: dict = {}

    def __call__(self, seq_lens, device=None):
        """The mask `layer.attention` takes for a packed row of segments `seq_lens` (ints), on `device`."""
        if not self.use_flex:
            return dense_doc_mask(seq_lens, device)
        return self.block(seq_lens, device)

    def _mask_mod(self, width: int, device):
        key = (width, str(device))
        if key not in self._fns:
            buf = torch.zeros(width, dtype=torch.long, device=device)

            def mask_mod(b, h, q, kv):
                return (buf[q] == buf[kv]) & (q >= kv)
            self._fns[key] = buf, mask_mod
        return self._fns[key]

    def block(self, seq_lens, device=None, block: int = BLOCK):
        """A FlexAttention BlockMask, causal per segment (segment lengths summing to a multiple of `block`). The
        block tables are worked out on the host (a few hundred blocks) and copied once."""
        from torch.nn.attention.flex_attention import BlockMask

        doc = doc_ids(seq_lens)                                           # (s,) host
        s = doc.shape[0]
        if s % block:
            raise ValueError(f"packed width {s} is not a multiple of the block size {block}")
        nb = s // block
        blocks = doc.view(nb, block)
        lo, hi = blocks[:, 0], blocks[:, -1]                               # (nb,) first/last segment of a block
        qi = torch.arange(nb)
        below = qi[:, None] > qi[None, :]                                  # key block strictly before query block
        diag = qi[:, None] == qi[None, :]
        overlap = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])  # some segment in both blocks
        single = lo == hi
        full = below & single[:, None] & single[None, :] & (lo[:, None] == lo[None, :])
        partial = ((below & overlap) | diag) & ~full
        buf, mask_mod = self._mask_mod(s, device)
        buf.copy_(doc, non_blocking=True)
        kv_n, kv_i = (t.to(device, non_blocking=True) for t in _ordered(partial))
        full_n, full_i = (t.to(device, non_blocking=True) for t in _ordered(full))
        return BlockMask.from_kv_blocks(kv_n, kv_i, full_n, full_i, BLOCK_SIZE=block, mask_mod=mask_mod,
                                        seq_lengths=(s, s))
