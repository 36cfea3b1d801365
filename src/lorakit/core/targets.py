"""Which modules of a model an adapter can take (the base module type -> LoRA layer class) and which a target
spec selects (PEFT's matching rules: module-name suffixes, a regex on the path, or "all-linear")."""
from __future__ import annotations

import re

import torch.nn as nn

from lorakit.config import ALL_LINEAR
from lorakit.core.conv_embedding import WRAPPERS as CONV_EMBEDDING_WRAPPERS
from lorakit.core.layer import LoraLinear


def output_head_paths(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {p for p, m in model.named_modules() if head is not None and m is head}


# base module type -> the LoRA layer class that takes it over. Conv/embedding layers come from conv_embedding.py;
# the 4-bit linear of nf4.py adds itself when that module is imported (only it makes NF4Linear modules).
WRAPPERS: dict[type, type[LoraLinear]] = {nn.Linear: LoraLinear, **CONV_EMBEDDING_WRAPPERS}


def wrapper_types() -> dict[type, type[LoraLinear]]:
    return WRAPPERS


def wrapper_for(mod: nn.Module) -> type[LoraLinear] | None:
    """The LoRA class for `mod` (its own class if it is a LoRA layer already), or None."""
    if isinstance(mod, LoraLinear):
        return type(mod)
    return next((w for t, w in wrapper_types().items() if isinstance(mod, t)), None)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Module paths a target spec selects (PEFT's matching rules). Unknown names are errors.
    "all-linear" takes linear layers only; names and regexes may also pick Conv1d/Conv2d/Embedding."""
    kinds = {p: w.kind for p, m in model.named_modules() if (w := wrapper_for(m)) is not None}
    cands = list(kinds)
    if targets == ALL_LINEAR:
        heads = output_head_paths(model)
        found = [p for p in cands if p not in heads and kinds[p] == "linear"]
    elif isinstance(targets, str):
        found = [p for p in cands if re.fullmatch(targets, p)]
        if not found:
            raise ValueError(f"target regex {targets!r} matches no linear, conv or embedding module; "
                             f"such modules look like {cands[:3]}")
    else:
        found = []
        suffixes = sorted({p.rsplit(".", 1)[-1] for p in cands})
        for t in targets:
            hit = [p for p in cands if p == t or p.endswith("." + t)]
            if not hit:
                raise ValueError(f"unknown target module {t!r}: no linear, conv or embedding module of that "
                                 f"name; the model's such modules are {suffixes}")
            found += hit
        found = sorted(set(found), key=cands.index)
    if not found:
        raise ValueError(f"targets {targets!r} select no module")
    return found
