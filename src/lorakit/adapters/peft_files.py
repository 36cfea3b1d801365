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
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.version import __version__
from lorakit.config import LoraConfig
from lorakit.files import atomic_write_dir, atomic_write_file, atomic_write_json
from lorakit.core.inject import (LoraLinear, active_adapters, adapter_configs, add_adapter, delete_adapter,
                                 lora_layers, mark_trainable, set_active, wrapper_for)
from lorakit.adapters.intake import adapter_cap, open_member, read_member
from lorakit.adapters.patterns import attach as attach_patterns
from lorakit.adapters.refs import CONFIG_NAME, WEIGHTS_NAME, content_sha256  # noqa: F401  (re-exported)

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
    shapes, kinds, kernels = {}, {}, {}
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            shapes[path] = [mod.out_features, mod.in_features]
            kinds[path] = mod.kind
        elif (wrap := wrapper_for(mod)) is not None:  # linear, 4-bit linear, conv, embedding
            shapes[path] = list(wrap.shape_of(mod))
            kinds[path] = wrap.kind
        if kinds.get(path) == "conv":
            kernels[path] = list(getattr(mod, "kernel_size", ()))
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
        "kinds": kinds,  # what an adapter's tensors must look like per module (check_layouts); not in shape_hash
        "kernels": kernels,
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
            hidden = f", hidden {base_fp['hidden_size']}" if base_fp.get("hidden_size") is not None else ""
            raise ValueError(f"adapter is for another base: module {path!r} is (out, in)={tuple(shape)} "
                             f"in the adapter but {tuple(base_shapes[path])} in the base model "
                             f"({base_fp['architecture']}{hidden})")


def check_layouts(af: "AdapterFile", base_fp: dict) -> None:
    """Raise ValueError naming the module whose tensors do not have the layout of the base's layer there
    (PEFT's: linear A (r, in), B (out, r); embedding .lora_embedding_A/B, 2-D; conv A (r, in, *kernel), B (out, r,
    1...)). A conv-shaped pair on a linear layer would pass the (out, in) check and fail every request later.
    Bases fingerprinted before kinds were recorded are not checked."""
    kinds, kernels = base_fp.get("kinds"), base_fp.get("kernels") or {}
    if not kinds:
        return
    where = str(af.path / WEIGHTS_NAME)
    emb = {k.removeprefix(PREFIX).rsplit(".", 1)[0] for k in af.tensors
           if any(k.endswith(s) for s in EMBEDDING_SUFFIXES)}
    for path, parts in af.modules().items():
        kind, A, B = kinds.get(path), parts["lora_A"], parts["lora_B"]
        got = f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
        if kind is None:
            continue  # check_compatible names modules the base lacks
        if (kind == "embedding") != (path in emb):
            keys = "lora_embedding_A/B" if kind == "embedding" else "lora_A.weight/lora_B.weight"
            raise ValueError(f"{where}: module {path!r} is a{'n' if kind[0] in 'ae' else ''} {kind} layer on the base; "
                             f"its tensors must be named .{keys}")
        want = 2 + len(kernels.get(path, ())) if kind == "conv" else 2
        if A.dim() != want or B.dim() != want:
            shape = "(r, in, *kernel) and (out, r, 1...)" if kind == "conv" else "(r, in) and (out, r)"
            raise ValueError(f"{where}: module {path!r} is a{'n' if kind[0] in 'ae' else ''} {kind} layer on the base, "
                             f"but the adapter has {got}; expected {shape}")
        if kind == "conv" and list(A.shape[2:]) != list(kernels.get(path, ())):
            raise ValueError(f"{where}: module {path!r} is a conv layer with kernel {tuple(kernels[path])} on the base, "
                             f"but the adapter has {got}")
        if kind != "linear" and "lora_magnitude_vector" in parts:
            raise ValueError(f"{where}: module {path!r} is a {kind} layer; lorakit applies DoRA to linear layers only")


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
    """Write adapter `name` in the PEFT layout. `metadata` (JSON-able) lands in the safetensors header.
    `base_name`: the config's base_model_name_or_path; default: where load_base found the base (models.base_reference),
    so PEFT's AutoPeftModelForCausalLM finds it offline."""
    if base_name is None:
        from lorakit.core.state import state_of

        base_name = state_of(model).base_ref
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
        "lorakit.base_fingerprint": json.dumps({**fp, "shapes": targeted,
                                                **{k: {p: v for p, v in fp[k].items() if p in targeted}
                                                   for k in ("kinds", "kernels")}}),
        "lorakit.metadata": json.dumps(metadata or {}),
    }
    # a causal LM (it can generate) is PEFT's CAUSAL_LM task; anything else (a UNet) gets no task type, which
    # PEFT loads as a plain PeftModel (its causal-LM wrapper would look for generation methods)
    causal = callable(getattr(model, "prepare_inputs_for_generation", None))
    peft_cfg = cfg.to_peft(base_name, "CAUSAL_LM" if causal else None)

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
            # PeftModel.save_pretrained writes base_model.model.<path>; get_peft_model_state_dict of a model that
            # inject_adapter_in_model adapted (diffusers' way) gives <path> alone: both read the same
            path = key.removeprefix(PREFIX)
            for suffix, attr in {**PARAM_SUFFIXES, **EMBEDDING_SUFFIXES}.items():
                if path.endswith(suffix):
                    out.setdefault(path[:-len(suffix)], {})[attr] = t
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


def read_adapter(path: str | Path, resolved: object = None) -> AdapterFile:
    """Read and parse an adapter directory. Its rank_pattern / alpha_pattern are matched against its module paths
    here, within a time limit (adapters/patterns.py), or taken from `resolved` (what the registry stored at add
    time): the returned config answers rank_for / alpha_for for its modules without running a regex."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    raw = read_member(path, CONFIG_NAME)  # a regular file of at most 8 MiB: never a FIFO or /dev/zero
    try:
        peft_cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from None
    if not isinstance(peft_cfg, dict):
        raise ValueError(f"{str(cfg_file)!r} must hold a JSON object")
    try:
        config = LoraConfig.from_peft(peft_cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{str(cfg_file)!r}: {e}") from None
    os.close(open_member(path, WEIGHTS_NAME, adapter_cap(None), inside=False)[0])  # a regular file
    try:
        tensors = load_file(str(w_file))
        from safetensors import safe_open

        with safe_open(str(w_file), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(w_file)!r} is not a readable safetensors file: {e}") from None
    if not tensors:
        raise ValueError(f"{str(w_file)!r} holds no tensors")
    af = AdapterFile(path, config, peft_cfg, tensors, header)
    try:
        attach_patterns(config, list(af.modules()), resolved)
    except ValueError as e:
        raise ValueError(f"{str(cfg_file)!r}: {e}") from None
    return af


# The largest per-entry weight change an adapter may make, bounded by s * r * max|A| * max|B|
# (s = alpha/r or alpha/sqrt(r)). Real adapters are below 1e3; larger values overflow bf16/fp16 activations.
MAX_DELTA_BOUND = 1e6


def validate_adapter(af: AdapterFile, base_fp: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The one check every entry point runs (registry add, load_adapter, merge, the server's slot load),
    before anything changes: every tensor floating-point and finite; r and alpha (and their per-module
    patterns) finite and positive; A and B ranks agree with each other and with the config; a DoRA
    magnitude exactly where use_dora says, of B's output size; the weight change bounded (MAX_DELTA_BOUND);
    and, given the base's fingerprint, every module's shape as on the base. Returns af.modules()."""
    where, cfg = str(af.path / WEIGHTS_NAME), af.config
    mods = af.modules()
    for path, parts in mods.items():
        for attr, t in parts.items():
            key = f"{path}.{attr}"
            if not t.is_floating_point():
                raise ValueError(f"{where}: tensor {key!r} has dtype {t.dtype}; expected a floating-point tensor")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")
        A, B = parts["lora_A"], parts["lora_B"]
        if A.dim() < 2 or B.dim() < 2 or A.shape[0] != B.shape[1] or any(d != 1 for d in B.shape[2:]):
            raise ValueError(f"{where}: module {path!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                             "expected A (r, in, ...) and B (out, r, 1...) of the same rank r")
        r_cfg = cfg.rank_for(path)
        if A.shape[0] != r_cfg:
            raise ValueError(f"{where}: module {path!r} has rank {A.shape[0]} in its tensors but r={r_cfg} in "
                             f"{CONFIG_NAME} (r / rank_pattern)")
        mag = parts.get("lora_magnitude_vector")
        if mag is not None and not cfg.use_dora:
            raise ValueError(f"{where}: module {path!r} has a DoRA magnitude but use_dora is false")
        if cfg.use_dora and (mag is None or tuple(mag.shape) != (B.shape[0],)):
            raise ValueError(f"{where}: use_dora is true but module {path!r} has magnitude "
                             f"{None if mag is None else tuple(mag.shape)}; expected ({B.shape[0]},)")
        alpha, scale = cfg.alpha_for(path), cfg.scale_for(path)
        bound = scale * r_cfg * float(A.abs().max()) * float(B.abs().max())
        if not bound <= MAX_DELTA_BOUND:
            raise ValueError(f"{where}: module {path!r} could change a weight by up to {bound:.3g} "
                             f"(alpha {alpha}, max|A| {float(A.abs().max()):.3g}, max|B| {float(B.abs().max()):.3g}); "
                             f"the limit is {MAX_DELTA_BOUND:g}")
    if base_fp is not None:
        check_compatible(af.module_shapes(), base_fp)
        check_layouts(af, base_fp)
    return mods


def read_metadata(path: str | Path) -> dict:
    """An adapter's lorakit metadata (the safetensors header's "lorakit.metadata"), without reading its
    tensors; {} for an adapter written by another tool."""
    from safetensors import safe_open

    w_file = Path(path) / WEIGHTS_NAME
    if not w_file.exists():
        raise FileNotFoundError(f"adapter {str(path)!r} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(w_file), "pt") as f:
            raw = (f.metadata() or {}).get("lorakit.metadata")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(w_file)!r} is not a readable safetensors file: {e}") from None
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise ValueError(f"{str(w_file)!r}: lorakit.metadata in its header is not JSON") from None
    return meta if isinstance(meta, dict) else {}


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False,
                 activate: bool = True, dtype: torch.dtype | None = None) -> AdapterFile:
    """Attach an adapter written by lorakit or PEFT. The file is validated (`validate_adapter`: finite
    tensors, consistent ranks, shapes against this model) before anything is changed; a refused load
    leaves the model as it was."""
    af = read_adapter(path)
    mods = validate_adapter(af, fingerprint(model))
    if name in adapter_configs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete it first")
    cfg = af.config
    # Attach exactly the modules the file has (robust to target-spec differences between tools).
    attach_cfg = LoraConfig(**{**cfg.to_dict(), "targets": "|".join(_re_escape(p) for p in mods),
                               "rank_pattern": {}, "alpha_pattern": {}})
    ranks = {p: t["lora_A"].shape[0] for p, t in mods.items()}
    alphas = {p: cfg.alpha_for(p) for p in mods}
    attach_cfg.rank_pattern = {_re_escape(p): r for p, r in ranks.items()}
    attach_cfg.alpha_pattern = {_re_escape(p): a for p, a in alphas.items()}
    before = (active_adapters(model), [p for p in model.parameters() if p.requires_grad])
    add_adapter(model, attach_cfg, name, activate=False, dtype=dtype)
    try:
        adapter_configs(model)[name] = cfg
        with torch.no_grad():
            for path_, layer in lora_layers(model):
                for attr, t in mods.get(path_, {}).items():
                    getattr(layer.adapters[name], attr).copy_(t)
    except BaseException:  # validated above, so not expected: still, leave the model as it was
        delete_adapter(model, name)
        set_active(model, before[0])
        for p in before[1]:
            p.requires_grad_(True)
        raise
    mark_trainable(model, name if trainable else None)
    if activate:
        set_active(model, name)
    return af


def _re_escape(p: str) -> str:
    return p.replace(".", r"\.")
