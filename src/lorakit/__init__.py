"""lorakit: LoRA fine-tuning, portable adapters (PEFT layout) and multi-adapter serving.

The public names below load on first use (PEP 562), so `import lorakit` and the command line's `--help` do not
import torch."""
from lorakit.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "LoraConfig": "lorakit.config", "TrainConfig": "lorakit.config", "ServeConfig": "lorakit.config",
    **{n: "lorakit.core.inject" for n in ("LoraLinear", "active_adapters", "add_adapter", "adapter_names",
                                          "count_params", "delete_adapter", "disabled", "merge", "set_active",
                                          "trainable_report", "unload", "unmerge")},
    **{n: "lorakit.adapters.peft_files" for n in ("fingerprint", "load_adapter", "read_adapter", "save_adapter")},
    "load_base": "lorakit.models",
    "compose": "lorakit.adapters.compose",
    "Router": "lorakit.core.mixture",
    "train_router": "lorakit.train.router",
    "quantize_model": "lorakit.core.nf4",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
