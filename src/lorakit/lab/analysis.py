"""The low-rank hypothesis, measured: how much of a full fine-tune's weight change lives in its top singular
directions. For every linear weight of the decoder layers, dW = W_finetuned - W_base; its singular values
s_1 >= s_2 >= ...; the energy kept by rank r is sum_{i<=r} s_i^2 / sum_i s_i^2 (the share of ||dW||_F^2 that
the best rank-r approximation keeps, Eckart-Young). LoRA at rank r can at best represent that approximation.

A reference point: a Gaussian random matrix of the same shape (no low-rank structure at all) keeps about
r / min(out, in) of its energy in r directions (a bit more, by the Marchenko-Pastur spread).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> weight (out, in) for every linear layer inside the decoder layers (LoRA's targets)."""
    from lorakit.core.inject import LoraLinear

    return {path: mod.weight for path, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, LoraLinear)) and LAYER_RE.search(path)}


def weight_deltas(tuned: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """path -> W_tuned - W_base in float32, (out, in)."""
    a, b = linear_weights(tuned), linear_weights(base)
    if set(a) != set(b):
        raise ValueError(f"the two models have different linear layers: {sorted(set(a) ^ set(b))[:4]}")
    return {p: a[p].detach().float() - b[p].detach().float() for p in a}


def energy_at(s: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """Share of sum(s^2) in the top r singular values, for each r (capped at len(s))."""
    e = s.double().pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return {r: float(cum[min(r, len(s)) - 1]) for r in ranks}


def rank_for(s: torch.Tensor, share: float) -> int:
    """Smallest r whose top-r singular values hold `share` of the energy."""
    e = s.double().pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return int((cum < share).sum()) + 1


def random_energy(shape: tuple[int, int], ranks: list[int], seed: int = 0) -> dict[int, float]:
    g = torch.Generator().manual_seed(seed)
    return energy_at(torch.linalg.svdvals(torch.randn(shape, generator=g)), ranks)


def kind_of(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def analyze(tuned: nn.Module, base: nn.Module, ranks: list[int]) -> dict:
    """Per module: layer, kind, shape, relative change ||dW||/||W||, energy at each rank, r for 50/90/99%.
    Per kind (q_proj, ..., down_proj) and overall: the mean energy at each rank, and a random-matrix reference.
    Energy lists are aligned with `ranks` (JSON-friendly)."""
    base_w = linear_weights(base)
    modules = []
    for path, d in weight_deltas(tuned, base).items():  # d: (out, in)
        s = torch.linalg.svdvals(d)
        m = LAYER_RE.search(path)
        modules.append({"module": path, "layer": int(m.group(1)), "kind": kind_of(path), "shape": list(d.shape),
                        "rel_change": float(d.norm() / base_w[path].float().norm().clamp_min(1e-30)),
                        "energy": list(energy_at(s, ranks).values()), "r50": rank_for(s, 0.5), "r90": rank_for(s, 0.9),
                        "r99": rank_for(s, 0.99)})
    if not modules:
        raise ValueError("no decoder linear layers found to analyse")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for m in modules:
        by_kind[m["kind"]].append(m)

    def mean_energy(ms):  # aligned with `ranks`
        return [sum(m["energy"][i] for m in ms) / len(ms) for i in range(len(ranks))]

    kinds = {k: {"shape": ms[0]["shape"], "energy": mean_energy(ms),
                 "r90": sum(m["r90"] for m in ms) / len(ms),
                 "rel_change": sum(m["rel_change"] for m in ms) / len(ms),
                 "random_energy": list(random_energy(tuple(ms[0]["shape"]), ranks).values())}
             for k, ms in by_kind.items()}
    return {"ranks": ranks, "modules": modules, "kinds": kinds, "overall": mean_energy(modules)}
