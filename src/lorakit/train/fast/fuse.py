"""Stack the frozen q/k/v (and gate/up) weights into one buffer, in place.

After `fuse_projections`, `q_proj.weight`, `k_proj.weight` and `v_proj.weight` are row blocks (views)
of one contiguous (q + k + v, hidden) tensor; the Parameters, their names and their values are
unchanged, the HF forward still works, and the fast path does one matmul instead of three. No
memory is added: the old per-module storages are freed. `unfuse_projections` gives each weight its
own storage back (do that before saving the whole base model with safetensors, which refuses
tensors that share storage; adapter files are unaffected).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lorakit import arch


def groups(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of a layer's attention input projections and MLP gate/up projections (arch: the family's)."""
    fam = arch.family(model, "the fast path")
    return fam.qkv, fam.gate_up


def _modules(model: nn.Module):
    """Per decoder layer, the module lists that may be stacked: q/k/v and gate/up (one module where fused)."""
    for layer in arch.decoder_layers(model):
        p = arch.layer_parts(layer)
        qkv, gate_up = groups(model)
        yield [getattr(p.attn, n) for n in qkv]
        yield [getattr(p.mlp, n) for n in gate_up]


def _stack(params: list) -> torch.Tensor | None:
    """Move Parameters into one stacked buffer (rows concatenated); each becomes a view of it."""
    if params[0] is None:
        return None
    buf = torch.cat([p.data for p in params])
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = buf[row:row + n]
        row += n
    return buf


def fusable(mods: list) -> bool:
    """Frozen weights of one dtype and device, biases all present or all absent."""
    ws = [m.weight for m in mods]
    bs = [getattr(m, "bias", None) for m in mods]
    return (all(isinstance(w, nn.Parameter) and not w.requires_grad for w in ws)
            and len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1
            and (all(b is None for b in bs) or all(b is not None and not b.requires_grad for b in bs)))


def _adjacent(ts: list) -> torch.Tensor | None:
    """One tensor viewing `ts` stacked along dim 0, if they already lie back to back in one
    storage (else None)."""
    t0 = ts[0].data
    stride = t0.stride(0) if t0.dim() == 2 else 1
    offset = t0.storage_offset()
    for t in ts:
        t = t.data
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in ts)
    shape = (rows, t0.shape[1]) if t0.dim() == 2 else (rows,)
    return torch.as_strided(t0, shape, (stride, 1) if t0.dim() == 2 else (1,))


def stacked(mods: list) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The stacked (weight, bias) backing `mods`, or None if they are not (or no longer) one
    buffer, e.g. after `model.to(...)` gave the parameters new storage."""
    w = _adjacent([m.weight for m in mods])
    if w is None:
        return None
    if getattr(mods[0], "bias", None) is None:
        return w, None
    b = _adjacent([m.bias for m in mods])
    return None if b is None else (w, b)


def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v and gate/up weights of every decoder layer whose weights are frozen.
    Returns how many groups are stacked afterwards (already stacked ones count)."""
    count = 0
    for mods in _modules(model):
        if len(mods) < 2 or not fusable(mods):
            continue
        if stacked(mods) is None:
            with torch.no_grad():
                _stack([m.weight for m in mods])
                _stack([getattr(m, "bias", None) for m in mods])
        count += 1
    return count


def unfuse_projections(model: nn.Module) -> None:
    """Give every stacked weight (and bias) its own storage again."""
    for mods in _modules(model):
        for m in mods:
            for p in (m.weight, getattr(m, "bias", None)):
                if p is not None:
                    p.data = p.data.clone()
