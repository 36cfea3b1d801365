"""A 4-bit base too big for one process's memory, loaded shard by shard under FSDP2 (`--parallel fsdp --quantize
nf4` on several processes).

`load_meta` builds the model from its config with every parameter on the meta device (no memory; the buffers,
such as the rotary tables, are computed as usual) and its linear layers as 4-bit weights of the right shapes, also
on meta. The loop adds the adapters (on meta too) and the Runner flattens the 4-bit weights and `fully_shard`s
every unit, still on meta; then `materialize` gives each rank memory for its shards only (`to_empty`) and fills
them one weight at a time: the dense weight is read from the checkpoint (safetensors, memory-mapped), converted
to the training dtype on this rank's device, quantized, packed as FlatNF4Weight packs it, and this rank's chunk is
kept. At any moment a rank holds its shards plus one dense weight. The adapters get the values one process gives
them: the same seed, the same initialisation in the same order, on full tensors, each rank keeping its chunk.
"""
from __future__ import annotations

import contextlib
import json
import math
import zlib
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core.layer import LoraPair
from lorakit.core.nf4 import NF4Linear, NF4Weight, quantize_nf4
from lorakit.core.nf4_shard import FlatNF4Weight, pack_state
from lorakit.core.state import state_of
from lorakit.core.targets import find_targets
from lorakit.kernels import nf4_lib


@contextlib.contextmanager
def params_on_meta():
    """Within: every parameter a module registers is moved to the meta device as it is registered (its
    initialisation then runs on meta, costing nothing); buffers stay where they are made."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_nf4_state(n: int) -> dict[str, torch.Tensor]:
    """The NF4 state of an n-value weight (core/nf4.quantize_nf4's shapes and dtypes), on meta."""
    nb = -(-n // 64)
    m = dict(device="meta")
    return {"codes": torch.empty(-(-n // 2), dtype=torch.uint8, **m),
            "absmax_q": torch.empty(nb, dtype=torch.uint8, **m),
            "absmax_scale": torch.empty(-(-nb // 256), dtype=torch.float32, **m),
            "absmax_mean": torch.empty((), dtype=torch.float32, **m)}


def load_meta(name: str, dtype: torch.dtype, device: torch.device):
    """-> (model, tokenizer): the base `name` (a model directory, as load_base finds it) with its parameters on
    meta and its linear layers (not the output head) 4-bit, frozen; `materialize` fills it after sharding."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import base_reference, model_name, resolve_model_path

    path, gguf = resolve_model_path(name)
    if gguf:
        raise ValueError("a GGUF base is not read shard by shard; convert it to safetensors or use --parallel ddp")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for target in find_targets(model, "all-linear"):
        lin = model.get_submodule(target)
        q = NF4Weight(state=meta_nf4_state(lin.weight.numel()), shape=tuple(lin.weight.shape), dtype=dtype)
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NF4Linear(q, lin.bias))
    st = state_of(model)
    st.quant, st.source = "nf4", {"path": str(path), "dtype": dtype, "device": device}
    st.base_name, st.base_ref = model_name(name), base_reference(name)
    return model, tok


RANDOM_KEY = "lorakit_random_weights"  # in config.json: no checkpoint, seeded random weights (benchmarks)


def checkpoint_reader(path: str | Path, device: torch.device):
    """-> read(key, shape) -> the checkpoint's tensor (CPU, memory-mapped) from model.safetensors or its index.
    A directory without weights whose config.json holds {"lorakit_random_weights": {"std": s}} (a benchmark's
    model too big for its disk, bench/gpu_qlora_fsdp.py) reads seeded random weights instead: N(0, s) for
    matrices, N(1, s) for vectors (norms), one generator on `device` seeded from the key."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    random = json.loads((path / "config.json").read_text()).get(RANDOM_KEY)
    if random is not None and not index.exists() and not (path / "model.safetensors").exists():
        def draw(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
            t = torch.empty(shape, dtype=torch.float32, device=device)
            return t.normal_(0.0 if len(shape) >= 2 else 1.0, float(random["std"]), generator=g)

        return draw
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    opened: dict[str, object] = {}

    def read(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        name = files[key] if files is not None else "model.safetensors"
        if name not in opened:
            opened[name] = safe_open(str(path / name), "pt", device="cpu")
        t = opened[name].get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key}: the checkpoint holds {tuple(t.shape)}, the model expects {tuple(shape)}")
        return t

    return read


def fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's chunk of `full` (a sharded parameter's whole value) into its local tensor (which may be in
    host memory while the mesh is on the GPU: FSDP's CPU offload)."""
    local = param.to_local() if hasattr(param, "to_local") else param
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dtype=local.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None).to_local()  # chunked on the mesh's device, no collective
    local.copy_(full.reshape(local.shape).to(local.device, local.dtype))


def pending(model: nn.Module) -> bool:
    """True when `model` came from `load_meta` and is not materialized yet."""
    return state_of(model).source is not None and any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, seed: int, params_device: torch.device | None = None) -> int:
    """Memory for this rank's shards only, filled from the checkpoint (module doc); -> dense weights read. The
    parameters' memory on `params_device` (FSDP's CPU offload: host memory; default: the rank's device), each
    weight still read and quantized on the rank's device; the buffers stay where they are."""
    src = state_of(model).source
    device, dtype = src["device"], src["dtype"]
    buffers = [(mod, n, b) for mod in model.modules() for n, b in mod._buffers.items() if b is not None]
    model.to_empty(device=params_device or device)
    for mod, n, b in buffers:  # to_empty left them garbage (and on params_device): the computed ones back
        mod._buffers[n] = b
    read = checkpoint_reader(src["path"], device)
    torch.manual_seed(seed)  # the adapters' initialisation, as one process runs it after the loop's seed
    n_read, seen = 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, LoraPair):
            if mod.lora_magnitude_vector is not None:
                raise ValueError("DoRA's magnitude is computed from the base weight: a base loaded shard by shard "
                                 "trains LoRA only; drop --dora")
            a = torch.empty(tuple(mod.lora_A.shape), dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoraPair's own initialisation
            b = torch.zeros(tuple(mod.lora_B.shape), dtype=dtype, device=device)
            if not mod.init_b_zero:
                nn.init.normal_(b, std=0.02)
            fill(mod.lora_A, a)
            fill(mod.lora_B, b)
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight, filled once
                continue
            seen.add(id(p))
            key, shape = (name, mod.shape) if isinstance(mod, FlatNF4Weight) else (f"{name}.{pname}", p.shape)
            w = read(key, tuple(shape)).to(device, dtype)
            n_read += 1
            if isinstance(mod, FlatNF4Weight):
                lib = nf4_lib.resolve(mod.lib, device)
                state = nf4_lib.bnb_quantize(w) if lib == "bnb" else quantize_nf4(w)
                w, layout = pack_state({k: state[k] for k, *_ in mod.layout}, p.dtype)
                if layout != mod.layout:  # the bytes must land where the sharded layout expects them
                    raise ValueError(f"{key}: quantized state {layout} does not match the sharded layout {mod.layout}")
            fill(p, w)
            del w
    state_of(model).source = None
    return n_read
