"""lorakit's state on a model, in one attribute (`model.lorakit`) instead of loose ones: the adapters' configs,
which adapters run with what weight, what the base was loaded as, and how it is quantized."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from lorakit.config import LoraConfig


@dataclass
class ModelState:
    configs: dict[str, LoraConfig] = field(default_factory=dict)  # adapter name -> its config, in insertion order
    active: dict[str, float] = field(default_factory=dict)  # adapter name -> weight; empty: the base alone
    base_name: str | None = None  # what load_base was given ('embedded', a directory, a hub id)
    base_ref: str | None = None  # where load_base found it (models.base_reference): save_adapter's default base path
    quant: str | None = None  # "nf4" when the base's linear layers are held in 4 bits (core/nf4.py)
    source: dict | None = None  # a base built on meta, to be read shard by shard (train/shard_load.py)


def state_of(model: nn.Module) -> ModelState:
    """The model's ModelState, made on first use."""
    st = model.__dict__.get("lorakit")
    if st is None:
        st = ModelState()
        model.__dict__["lorakit"] = st  # a plain attribute: not a submodule, parameter or buffer
    return st
