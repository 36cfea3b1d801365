"""Putting LoRA layers into a model and taking them out: targets, add/delete adapters, the active set
(with weights), disable, merge/unmerge, unload, parameter counts, and the routing hook.

The layer itself (`LoraLinear`, y = W x + b + sum_k w_k * s_k * B_k A_k dropout(x)) is in `lorakit.core.layer`.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import torch
import torch.nn as nn

from lorakit.config import LoraConfig
from lorakit.core.layer import LoraLinear, Routing
from lorakit.core.state import state_of
from lorakit.core.targets import (WRAPPERS, output_head_paths, find_targets,  # noqa: F401 (re-exported)
                                  wrapper_for, wrapper_types)

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield path, mod


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *, activate: bool = True,
                dtype: torch.dtype | None = None) -> list[str]:
    """Insert adapter `name` on the modules `config.targets` selects. Freezes the base; the new
    adapter's A/B are the only trainable tensors afterwards. Returns the targeted module paths."""
    config.validate()
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model; delete it first")
    if config.modules_to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save} is not supported by lorakit yet")
    paths = find_targets(model, config.targets)
    for path in paths:  # refuse before anything changes
        mod = model.get_submodule(path)
        wrapper_for(mod).check_config(mod, config, path)
    owners: dict[int, list[str]] = {}  # parameter id -> module paths that hold it (tied weights)
    for p_, m in model.named_modules():
        for t in m.parameters(recurse=False):
            owners.setdefault(id(t), []).append(p_)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        mod = model.get_submodule(path)
        training = mod.training  # a new layer or adapter takes the train/eval mode of the module it adapts
        if not isinstance(mod, LoraLinear):
            parent, child = get_parent(model, path)
            mod = wrapper_for(mod)(mod)
            mod.tied_with = [o for o in owners.get(id(mod.weight), []) if o != path]
            setattr(parent, child, mod)
        pair = mod.add(name, config.rank_for(path), config.alpha_for(path), config.dropout, config.use_rslora,
                       config.use_dora, config.init_lora_weights, dtype=dtype)
        mod.train(training)
        pair.train(training)
    configs[name] = config
    if activate:
        set_active(model, name)
    mark_trainable(model, name)
    return paths


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return state_of(model).configs


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def check_names(model: nn.Module, names) -> None:
    known = adapter_configs(model)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; this model has {sorted(known)}")


def set_active(model: nn.Module, adapters: str | list[str] | dict[str, float] | None) -> None:
    """Which adapters run, and with what weight: a name, a list (weight 1 each), a {name: weight}
    dict (a weighted stack), or None (base only)."""
    if adapters is None:
        active = {}
    elif isinstance(adapters, str):
        active = {adapters: 1.0}
    elif isinstance(adapters, dict):
        active = {}
        for n, w in adapters.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weight for adapter {n!r} must be a finite number, got {w!r}")
            active[n] = float(w)
    else:
        active = {n: 1.0 for n in adapters}
    check_names(model, active)
    for _, layer in lora_layers(model):
        if layer.merged:
            raise ValueError("unmerge before changing the active adapters")
        layer.active = {n: w for n, w in active.items() if n in layer.adapters}
    state_of(model).active = dict(active)


def active_adapters(model: nn.Module) -> dict[str, float]:
    return dict(state_of(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model alone inside the block (adapters kept, not merged; a routing hook, e.g. a mixture's
    router, suspended)."""
    before = active_adapters(model)
    hooks = [(layer, layer.routing) for _, layer in lora_layers(model)]
    set_active(model, None)
    set_routing(model, None)
    try:
        yield model
    finally:
        for layer, hook in hooks:
            layer.routing = hook
        set_active(model, before)


def mark_trainable(model: nn.Module, name: str | None) -> None:
    """Only adapter `name`'s tensors train (None: nothing trains)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if name is None:
        return
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    check_names(model, [name])
    layers = list(lora_layers(model))
    for _, layer in layers:
        if any(m[0] == name for m in layer.merged):
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
    for path, layer in layers:
        if name in layer.adapters:
            del layer.adapters[name]
            layer.active.pop(name, None)
        if not layer.adapters:
            _restore_linear(model, path, layer)  # the last adapter is gone: a plain nn.Linear again
    del adapter_configs(model)[name]
    state_of(model).active = {n: w for n, w in active_adapters(model).items() if n != name}


def merge(model: nn.Module, names: list[str] | None = None, keep_original: bool = True) -> None:
    """Fold the active adapters (with their weights) into the base weights, in float32, rounded once.
    `keep_original` keeps a copy of each merged layer's base weight so that unmerge is exact bit for bit
    (memory: one more copy of those weights); unload(merge_active=True) skips it."""
    if names is not None:
        check_names(model, names)
    fresh = []  # layers this call merges first: unmerged again if a later layer refuses
    try:
        for _, layer in lora_layers(model):
            if not layer.merged:
                fresh.append(layer)
            layer.merge(names, keep_original=keep_original)
    except ValueError:
        for layer in fresh:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge_active: bool = False) -> nn.Module:
    """Put plain nn.Linear modules back (after merging the active adapters if asked)."""
    if merge_active:
        merge(model, keep_original=False)
    for path, layer in list(lora_layers(model)):
        if layer.merged and not merge_active:
            layer.unmerge()
        _restore_linear(model, path, layer)
    adapter_configs(model).clear()
    state_of(model).active = {}
    return model


def _restore_linear(model: nn.Module, path: str, layer: LoraLinear) -> None:
    parent, child = get_parent(model, path)
    setattr(parent, child, layer.to_base())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once. A quantized frozen weight (a
    module with `represented_params()`, core/nf4.py) counts as the parameters it stands for, not its storage."""
    stand_ins = [m for m in model.modules() if hasattr(m, "represented_params")]
    seen, trainable, total = {id(p) for m in stand_ins for p in m.parameters()}, 0, 0  # their storage: not counted
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    total += sum(m.represented_params() for m in stand_ins)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    t, n = count_params(model)
    return f"trainable params: {t:,} of {n:,} ({100.0 * t / max(n, 1):.4f}%)"


def set_routing(model: nn.Module, routing: Routing | None) -> None:
    for _, layer in lora_layers(model):
        layer.routing = routing


@contextlib.contextmanager
def routed(model: nn.Module, routing: Routing):
    set_routing(model, routing)
    try:
        yield model
    finally:
        set_routing(model, None)
