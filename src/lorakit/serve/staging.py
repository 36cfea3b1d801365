"""What a slot is written from, made off the engine thread: an adapter file's modules as (A, B, scale, DoRA
magnitude) (`adapter_scales`), staged into one host buffer in the bank's dtype (`staged` -> `Prepared`), and a
decode step's routing table (`routing_table`). serve/slots.py writes them into the slot bank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.adapters.peft_files import AdapterFile


def adapter_scales(af: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]:
    """module path -> (A (r, in), B (out, r), scale, DoRA magnitude (out,) or None) with the file's own ranks and
    alpha overrides."""
    cfg, out = af.config, {}
    for path, t in af.modules().items():
        A, B = t["lora_A"], t["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{str(af.path)!r}: module {path!r} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}; expected (r, in) and (out, r)")
        out[path] = (A, B, cfg.scale_for(path, r=A.shape[0]), t.get("lora_magnitude_vector"))
    return out


@dataclass
class Prepared:
    """An adapter as a slot holds it: module path -> (A (r, in), B (out, r), scale, DoRA magnitude or None), and
    the slot's scale `common` (the adapter's most frequent alpha / r). Plain modules are staged: A and B in the
    bank's dtype, B times scale / common where a module's scale differs, all of them views of one host buffer
    `buf`, which reaches the device in one copy."""
    mods: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]
    common: float
    buf: torch.Tensor | None = None


def staged(mods: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]],
           dtype: torch.dtype) -> Prepared:
    """`adapter_scales`' modules made into a Prepared (on the loader thread): every plain module's A and B in one
    host buffer; DoRA modules as they are (their slot needs the base weight, on the device)."""
    scales = [m[2] for m in mods.values()]
    common = max(sorted(set(scales)), key=scales.count)
    plain = [(p, m) for p, m in mods.items() if m[3] is None]
    buf = torch.empty(sum(m[0].numel() + m[1].numel() for _, m in plain), dtype=dtype)
    out, at = dict(mods), 0
    for path, (A, B, scale, _) in plain:
        a = buf[at:at + A.numel()].view(A.shape)
        b = buf[at + A.numel():at + A.numel() + B.numel()].view(B.shape)
        at += A.numel() + B.numel()
        a.copy_(A)
        b.copy_(B if scale == common else B.float() * (scale / common))
        out[path] = (a, b, common, None)
    return Prepared(out, common, buf if plain else None)


def view_of(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The part of `buf` (a copy of t's base buffer, possibly on another device) that `t` views."""
    return buf[t.storage_offset():t.storage_offset() + t.numel()].view(t.shape)


def routing_table(rows: list[tuple[list[int], list[float], str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (b, k) long, coef (b, k) float32) from each row's (slots, stack weights, ...): k the longest stack,
    shorter rows padded with slot 0 and weight 0. Built as lists, one tensor each (a decode step's host work)."""
    k = max(1, max(len(slots) for slots, _, _ in rows))
    idx, coef = [], []
    for slots, weights, _ in rows:
        n = min(len(slots), len(weights))
        idx.append(list(slots[:n]) + [0] * (k - n))
        coef.append([float(w) for w in weights[:n]] + [0.0] * (k - n))
    return torch.tensor(idx, dtype=torch.long), torch.tensor(coef, dtype=torch.float32)
