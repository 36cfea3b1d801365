"""Sampling on the device: the next token of every row of a step in a few tensor ops, one host transfer.

Greedy rows (temperature 0) take the argmax. A sampled row draws from softmax(logits / temperature) cut to its
top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p, the first always kept) by the
exponential race: token = argmax(p_i / E_i) with E_i = -log(u_i) ~ Exp(1), which picks i with probability p_i.
The uniforms u come from a counter-based hash of (row seed, row step, token id), so a row's draws depend on its
own seed and position alone: the same seed gives the same tokens whatever else is in the batch, and no generator
state is kept. Computed in float64 from logits minus their maximum, so any temperature > 0 gives finite values.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2^32; products wrap, only the low 32 bits are kept)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, vocab) float64 in (0, 1) from per-row seeds (n,) and steps (n,) (int64)."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    s = _hash32(_hash32(seeds & M32) ^ _hash32((seeds >> 32) + 0x9E3779B9))  # (n,)
    h = _hash32(s[:, None] ^ _hash32(steps[:, None] * 0x5BD1E995 + 0x27D4EB2F) ^ (ids[None, :] * 0x165667B1))
    h2 = _hash32(h ^ 0x68E31DA4)
    return ((h.double() * 2.0 ** 21 + (h2 >> 11).double()) + 0.5) / 2.0 ** 53  # 53 random bits, never 0 or 1


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """logits (n, vocab); temperature, top_p (n,) float; seeds, steps (n,) int64 -> tokens (n,) int64."""
    greedy = logits.argmax(-1)
    x = logits.double()
    t = temperature.double().clamp_min(1e-300)[:, None]
    probs = torch.softmax((x - x.max(-1, keepdim=True).values) / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p.double()[:, None]  # always keeps the first
    probs = torch.zeros_like(probs).scatter_(1, order, sorted_p * keep)
    race = probs / -torch.log(uniforms(seeds, steps, logits.shape[1]))
    return torch.where(temperature > 0, race.argmax(-1), greedy)
