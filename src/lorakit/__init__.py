"""lorakit: LoRA fine-tuning, portable adapters (PEFT layout) and multi-adapter serving."""
from lorakit.version import __version__  # noqa: E402

from lorakit.config import LoraConfig, ServeConfig, TrainConfig  # noqa: E402
from lorakit.core.inject import (  # noqa: E402
    LoraLinear,
    active_adapters,
    add_adapter,
    adapter_names,
    count_params,
    delete_adapter,
    disabled,
    merge,
    set_active,
    trainable_report,
    unload,
    unmerge,
)
from lorakit.adapters.files import fingerprint, load_adapter, read_adapter, save_adapter  # noqa: E402
from lorakit.models import load_base  # noqa: E402
from lorakit.adapters.compose import compose  # noqa: E402
from lorakit.core.mixture import Router  # noqa: E402
from lorakit.train.router import train_router  # noqa: E402
from lorakit.core.nf4 import quantize_model  # noqa: E402

__all__ = [
    "LoraConfig", "TrainConfig", "ServeConfig", "LoraLinear", "add_adapter", "adapter_names", "active_adapters",
    "set_active", "disabled", "delete_adapter", "merge", "unmerge", "unload", "count_params", "trainable_report",
    "save_adapter", "load_adapter", "read_adapter", "fingerprint", "load_base",
    "compose", "quantize_model", "Router", "train_router", "__version__",
]
