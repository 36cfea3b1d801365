"""Adapter files in the PEFT layout: adapter_config.json + adapter_model.safetensors.

Keys: base_model.model.<module path>.lora_A.weight (r, in) and .lora_B.weight (out, r);
DoRA adds .lora_magnitude_vector (out,); conv layers use the same two keys with A (r, in, *k) and
B (out, r, *1); embedding layers use .lora_embedding_A (r, num_embeddings) and .lora_embedding_B
(dim, r). lorakit's own metadata (base fingerprint, version, anything the caller adds) goes in the
safetensors header, never in adapter_config.json, so older PEFT releases that crash on unknown config
keys still read our files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.version import __version__
from lorakit.config import LoraConfig
from lorakit.files import atomic_write_dir, atomic_write_file, atomic_write_json
from lorakit.core.inject import (LoraLinear, _pattern, adapter_configs, add_adapter, lora_layers, mark_trainable, set_active,
                   wrapper_for)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# suffix in the file -> attribute on the layer's LoraPair
PARAM_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
}
# embedding layers: PEFT's nn.Parameter names (A (r, num_embeddings), B (dim, r)), no ".weight"
EMBEDDING_SUFFIXES = {".lora_embedding_A": "lora_A", ".lora_embedding_B": "lora_B"}


# ---------------------------------------------------------------- fingerprint
def fingerprint(model: nn.Module) -> dict:
    """What an adapter needs of its base: architecture and the shape of every linear module.
    `shape_hash` decides compatibility; `weight_hash` tells two bases of equal shape apart."""
    shapes = {}
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            shapes[path] = [mod.out_features, mod.in_features]
        elif (wrap := wrapper_for(mod)) is not None:  # linear, 4-bit linear, conv, embedding
            shapes[path] = list(wrap.shape_of(mod))
    cfg = getattr(model, "config", None)
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    shape_hash = hashlib.sha256(json.dumps([arch, sorted(shapes.items())]).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for path in sorted(shapes)[:8]:
        w = model.get_submodule(path).weight
        w = w.to_local() if hasattr(w, "to_local") else w  # FSDP shard: rank 0's holds the first rows (values)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.device.type != "meta":
            h.update(w.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return {
        "architecture": arch,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "shape_hash": shape_hash,
        "weight_hash": h.hexdigest()[:16],
        "shapes": shapes,
    }


def check_compatible(adapter_shapes: dict[str, list[int]], base_fp: dict) -> None:
    """Raise ValueError naming the first module whose shape differs (or is missing) on the base."""
    base_shapes = base_fp["shapes"]
    order = {p: i for i, p in enumerate(base_shapes)}  # report in the model's own module order
    for path, shape in sorted(adapter_shapes.items(), key=lambda kv: order.get(kv[0], -1)):
        if path not in base_shapes:
            raise ValueError(f"adapter targets module {path!r}, which the base model "
                             f"({base_fp['architecture']}) does not have")
        if list(base_shapes[path]) != list(shape):
            raise ValueError(f"adapter is for another base: module {path!r} is (out, in)={tuple(shape)} "
                             f"in the adapter but {tuple(base_shapes[path])} in the base model "
                             f"({base_fp['architecture']}, hidden {base_fp.get('hidden_size')})")


# ---------------------------------------------------------------- save
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        pair = layer.adapters[name]
        for suffix, attr in (EMBEDDING_SUFFIXES if layer.kind == "embedding" else PARAM_SUFFIXES).items():
            t = getattr(pair, attr, None)
            if t is not None:
                out[PREFIX + path + suffix] = t.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, path: str | Path, name: str = "default", *,
                 base_name: str | None = None, metadata: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter `name` in the PEFT layout. `metadata` (JSON-able) lands in the safetensors header."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
    cfg = configs[name]
    tensors = adapter_state_dict(model, name)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    fp = fingerprint(model)
    targeted = {p: fp["shapes"][p] for p, layer in lora_layers(model) if name in layer.adapters}
    header = {
        "format": "pt",
        "lorakit.version": __version__,
        "lorakit.base_fingerprint": json.dumps({**fp, "shapes": targeted}),
        "lorakit.metadata": json.dumps(metadata or {}),
    }
    peft_cfg = cfg.to_peft(base_name)

    path = Path(path)
    if path.is_dir():
        # an existing directory (e.g. a training run's output, with metrics beside the adapter):
        # replace the two files, each atomically, weights first
        atomic_write_file(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=header))
        atomic_write_json(path / CONFIG_NAME, peft_cfg)
    else:
        def write(tmp: Path):
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2))
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=header)

        atomic_write_dir(path, write)
    return path


# ---------------------------------------------------------------- read / load
@dataclass
class AdapterFile:
    path: Path
    config: LoraConfig
    peft_config: dict
    tensors: dict[str, torch.Tensor]
    header: dict

    @property
    def fingerprint(self) -> dict | None:
        raw = self.header.get("lorakit.base_fingerprint")
        return json.loads(raw) if raw else None

    @property
    def metadata(self) -> dict:
        return json.loads(self.header.get("lorakit.metadata") or "{}")

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """module path -> {attr: tensor}"""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            for suffix, attr in {**PARAM_SUFFIXES, **EMBEDDING_SUFFIXES}.items():
                if key.startswith(PREFIX) and key.endswith(suffix):
                    out.setdefault(key[len(PREFIX):-len(suffix)], {})[attr] = t
                    break
            else:
                raise ValueError(f"{self.path / WEIGHTS_NAME}: unsupported tensor key {key!r}")
        for path, parts in out.items():
            if "lora_A" not in parts or "lora_B" not in parts:
                raise ValueError(f"{self.path / WEIGHTS_NAME}: module {path!r} lacks lora_A or lora_B")
        return out

    def module_shapes(self) -> dict[str, list[int]]:
        return {p: [t["lora_B"].shape[0], t["lora_A"].shape[1]] for p, t in self.modules().items()}

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def read_adapter(path: str | Path) -> AdapterFile:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"adapter {str(path)!r} has no {CONFIG_NAME}")
    if not w_file.exists():
        if (path / "adapter_model.bin").exists():
            raise ValueError(f"{str(path / 'adapter_model.bin')!r} is a pickle file; lorakit reads safetensors only")
        raise FileNotFoundError(f"adapter {str(path)!r} has no {WEIGHTS_NAME}")
    try:
        peft_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from None
    if not isinstance(peft_cfg, dict):
        raise ValueError(f"{str(cfg_file)!r} must hold a JSON object")
    config = LoraConfig.from_peft(peft_cfg)
    try:
        tensors = load_file(str(w_file))
        from safetensors import safe_open

        with safe_open(str(w_file), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(w_file)!r} is not a readable safetensors file: {e}") from None
    if not tensors:
        raise ValueError(f"{str(w_file)!r} holds no tensors")
    return AdapterFile(path, config, peft_cfg, tensors, header)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False,
                 activate: bool = True, dtype: torch.dtype | None = None) -> AdapterFile:
    """Attach an adapter written by lorakit or PEFT. Shapes are checked against the model before
    anything is changed: a mismatch raises ValueError naming the module and both shapes."""
    af = read_adapter(path)
    mods = af.modules()
    check_compatible(af.module_shapes(), fingerprint(model))
    cfg = af.config
    # Attach exactly the modules the file has (robust to target-spec differences between tools).
    attach_cfg = LoraConfig(**{**cfg.to_dict(), "targets": "|".join(_re_escape(p) for p in mods),
                               "rank_pattern": {}, "alpha_pattern": {}})
    ranks = {p: t["lora_A"].shape[0] for p, t in mods.items()}
    alphas = {p: _pattern(cfg.alpha_pattern, p, cfg.alpha) for p in mods}
    attach_cfg.rank_pattern = {_re_escape(p): r for p, r in ranks.items()}
    attach_cfg.alpha_pattern = {_re_escape(p): a for p, a in alphas.items()}
    add_adapter(model, attach_cfg, name, activate=False, dtype=dtype)
    adapter_configs(model)[name] = cfg
    with torch.no_grad():
        for path_, layer in lora_layers(model):
            if path_ not in mods:
                continue
            pair = layer.adapters[name]
            for attr, t in mods[path_].items():
                if attr == "lora_magnitude_vector" and pair.lora_magnitude_vector is None:
                    raise ValueError(f"{af.path}: module {path_!r} has a DoRA magnitude but use_dora is false")
                getattr(pair, attr).copy_(t)
    mark_trainable(model, name if trainable else None)
    if activate:
        set_active(model, name)
    return af


def _re_escape(p: str) -> str:
    return p.replace(".", r"\.")
