"""FSDP2's setup for the training loop (train/distributed.py's Runner calls `shard`): which weights are sharded,
where their shards live, and the adapters' gradient sync when they are kept whole.

  units      every decoder layer, the input embedding and the output head (when two weights) and the root are
             `fully_shard`ed; a 4-bit base's state is first laid into one flat parameter a weight
             (core/nf4_shard.py); a base built on meta is then read shard by shard (train/shard_load.py).
  offload    `--offload params`: FSDP2's CPUOffloadPolicy on every unit. The sharded parameters (the 4-bit flat
             state, norms, embedding, head, sharded adapters), their gradients and AdamW state live in host memory
             (pinned on CUDA); each unit's shards are copied to the GPU just before its all-gather, its gradients
             reduce-scattered on the GPU and copied back, and AdamW steps on the CPU. The GPU holds the gathered
             units, the activations and what stays outside FSDP. The collectives on host tensors (gradient norm,
             checkpoint gathers) need a CPU backend beside NCCL: `distributed.init(offload=True)` makes the group
             "cuda:nccl,cpu:gloo".
  adapters   `--adapter-state shard` (default): the LoRA tensors are sharded like every weight, their gradients
             reduce-scattered after each micro-batch, each rank steps AdamW on its 1/world.
             `--adapter-state replicate`: the trainable tensors are `ignored_params` of every fully_shard call:
             whole on every rank's device (never offloaded), no gather, no reduce-scatter; their gradients
             accumulate locally over the step's micro-batches and are all-reduced (averaged) once per optimizer
             step (`sync_replicated`), so every rank steps AdamW on the same whole tensors to the same values.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

OFFLOAD = ("none", "params")
ADAPTER_STATE = ("shard", "replicate")
BUCKET = 2 ** 25  # elements a gradient all-reduce carries at once (128 MiB of fp32)


def check_options(mode: str, offload: str, adapter_state: str, full: bool) -> None:
    """Refuse, in one line, an FSDP option the run's mode cannot apply."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    if adapter_state not in ADAPTER_STATE:
        raise ValueError(f"adapter_state must be one of {ADAPTER_STATE}, got {adapter_state!r}")
    where = {"none": "one process", "ddp": "DDP (every rank holds the whole model)"}.get(mode, mode)
    if offload != "none" and mode != "fsdp":
        raise ValueError(f"--offload {offload} moves FSDP2's shards to host memory: it needs --parallel fsdp on "
                         f"several processes (torchrun / --nproc), this run is {where}")
    if adapter_state != "shard":
        if mode != "fsdp":
            raise ValueError(f"--adapter-state {adapter_state} chooses how FSDP2 holds the adapters: it needs "
                             f"--parallel fsdp on several processes, this run is {where}")
        if full:
            raise ValueError(f"--adapter-state {adapter_state} keeps the adapters whole; --full trains every weight "
                             "and FSDP shards them all: drop one of the two")


def offload_policy(device: torch.device):
    """FSDP2's CPUOffloadPolicy; its host buffers pinned where the device is a GPU (pinning needs one)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units below the root: the decoder layers (the classes Hugging Face lists in `_no_split_modules`),
    then the input embedding and the output head when they hold two weights (a tied pair stays with the root,
    which is gathered for the whole step)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"{type(model).__name__} lists no decoder layer classes (_no_split_modules={names or None}); "
                         "FSDP needs them to shard layer by layer: use --parallel ddp")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is not head.weight:
        units += [emb, head]
    return units


def shard(model: nn.Module, root: nn.Module, device: torch.device, world: int, offload: bool = False,
          replicate: bool = False) -> tuple[int, list[nn.Parameter]]:
    """fully_shard `model`'s units and `root` over a 1-D mesh of `world` ranks (module doc), a base built on meta
    read shard by shard; -> (base weights read shard by shard, the replicated trainable tensors)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(f"--parallel fsdp needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}; "
                         "use --parallel ddp") from None
    from lorakit.core.nf4 import NF4Weight
    from lorakit.core.nf4_shard import flatten_nf4
    from lorakit.train import shard_load

    mesh = init_device_mesh(device.type, (world,))
    if any(isinstance(m, NF4Weight) for m in model.modules()):  # the 4-bit state as one flat parameter a weight
        flatten_nf4(model)
    kept: list[nn.Parameter] = []
    if replicate:
        seen = set()
        kept = [p for p in model.parameters() if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
    opts = {"mesh": mesh, "ignored_params": set(kept) if kept else None}
    if offload:
        opts["offload_policy"] = offload_policy(device)
    for unit in shard_units(model):
        fully_shard(unit, **opts)
    fully_shard(root, **opts)  # the fast backend runs each unit as its module (fast.as_forward)
    read = 0
    if shard_load.pending(model):  # a base built on meta: each rank reads and quantizes its shards now
        read = shard_load.materialize(model, torch.initial_seed(), params_device=torch.device("cpu") if offload
                                      else None)
    if kept:  # to_empty (materialize) made new parameter objects: the trainable ones, still outside FSDP
        seen = set()
        kept = [p for p in model.parameters() if p.requires_grad and not hasattr(p, "device_mesh")
                and not (id(p) in seen or seen.add(id(p)))]
    with torch.no_grad():
        for p in kept:  # FSDP leaves ignored parameters where they are: on this rank's device, whole
            if p.device != device:
                p.data = p.data.to(device)
    return read, kept


@torch.no_grad()
def sync_replicated(params: list[nn.Parameter], world: int) -> None:
    """All-reduce the gradients of whole (replicated) tensors and divide by `world`: every rank then holds the
    global batch's gradient (each rank's loss is already scaled by world / the global target count). In buckets
    of at most BUCKET elements, one flat buffer each; a tensor without a gradient takes part with zeros."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        if not buckets or size + g.numel() > BUCKET or (g.dtype, g.device) != (buckets[-1][0].dtype,
                                                                               buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    for grads in buckets:  # the same order on every rank: the parameters' order
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
