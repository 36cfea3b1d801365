"""Training on several processes with PyTorch's own engine: torchrun, DDP and FSDP2 (`fully_shard`).

A process started by torchrun (WORLD_SIZE, RANK, LOCAL_RANK in its environment) joins the group with `init`
(gloo on CPU, NCCL on CUDA, device cuda:LOCAL_RANK); the one training loop asks `context()` where it runs and
drives the model through a `Runner`:
  ddp   the model stays whole on every device; DDP all-reduces the gradients of the trainable tensors only
        (the LoRA adapters; frozen weights have no gradient and no bucket); micro-batches before the last
        of an optimizer step skip the all-reduce (`no_sync`).
  fsdp  FSDP2: every decoder layer (the model's `_no_split_modules` classes), the input embedding and the output
        head (when they are two weights, not one tied) and the root are `fully_shard`ed, so each device holds
        1/world of every weight (frozen base, adapters, optimizer state) and gathers one unit at a time;
        gradients are reduce-scattered. Works for LoRA and for full fine-tuning, and for a 4-bit (QLoRA) base:
        each NF4 weight's state is first laid into one flat frozen parameter (core/nf4_shard.py), which FSDP
        shards and gathers like any weight. Options (train/fsdp.py): the shards in host memory (--offload
        params), the adapters whole on every rank with one all-reduce a step (--adapter-state replicate).
        In one process FSDP runs only inside a process group the caller made (world 1: e.g. CPU offload on
        one GPU, tests/gpu); `lorakit train` never makes one.
  auto  DDP when the base's weights (a 4-bit base's quantized bytes) take at most AUTO_SHARE of one device's
        memory, else FSDP.
Both engines average gradients over ranks; the loss each rank backpropagates is its rows' summed token loss
divided by (global target count / world), so the average is the loss of the whole global batch, exactly as
one process computes it. Checkpoints and final files gather full tensors (`full_tensor`) and rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lorakit.models import usable_cores
from lorakit.train.data import IGNORE

log = logging.getLogger("lorakit.train")

PARALLEL = ("auto", "ddp", "fsdp")
AUTO_SHARE = 0.25  # auto: DDP while the base's weights take at most a quarter of one device's memory


@dataclass(frozen=True)
class Context:
    """Where this process runs: one process (world 1) or rank `rank` of `world`."""
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1
    device: torch.device | None = None  # this rank's device (None: one process, the model's own)
    group: bool = False  # a process group exists (always where world > 1; world 1 only where a caller made one)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _device(requested: str | None) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = str(requested or "auto")
    if want == "cpu":
        return torch.device("cpu")
    if want in ("auto", "cuda") or want.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local)
        if want != "auto":
            raise ValueError(f"device {requested!r} asked for, but CUDA is not available on this machine")
        return torch.device("cpu")
    raise ValueError(f"device {requested!r}: under torchrun each process takes cuda:LOCAL_RANK or cpu; "
                     "pass --device auto, cuda or cpu")


def init(device: str | None = "auto", offload: bool = False) -> Context:
    """Join the process group torchrun set up (no-op in a single process); -> this process's Context. With
    `offload` (FSDP's shards in host memory) a GPU group gets gloo beside NCCL for the collectives on host tensors."""
    if not launched():
        return Context()
    if not dist.is_initialized():
        dev = _device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("cuda:nccl,cpu:gloo" if offload else "nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return context()


def context() -> Context:
    if not dist.is_initialized():
        return Context()
    nccl = "nccl" in str(dist.get_backend())  # "nccl", or "cuda:nccl,cpu:gloo" (init's offload)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Context(dist.get_world_size(), dist.get_rank(), local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                   torch.device("cuda", local) if nccl else torch.device("cpu"), group=True)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def default_threads(ctx: Context) -> int:
    """CPU threads for one rank: the cores this process may use, shared among the ranks of this node."""
    if ctx.world == 1:
        return 0
    return max(1, usable_cores() // ctx.local_world)


def choose_parallel(requested: str, model: nn.Module, ctx: Context) -> tuple[str, str]:
    """-> (mode, why): 'none' in one process, else 'ddp' or 'fsdp' (see the module doc for `auto`)."""
    if requested not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {requested!r}")
    if ctx.world == 1:
        if requested == "fsdp" and ctx.group:
            return "fsdp", "asked for, in a one-process group"
        return "none", "one process"
    if requested != "auto":
        return requested, "asked for"
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if ctx.device.type != "cuda":
        return "ddp", "CPU processes (the size rule is for GPU memory)"
    cap = torch.cuda.get_device_properties(ctx.device).total_memory
    share = nbytes / cap
    if share <= AUTO_SHARE:
        return "ddp", f"the base takes {share:.0%} of one device's memory (<= {AUTO_SHARE:.0%})"
    return "fsdp", f"the base takes {share:.0%} of one device's memory (> {AUTO_SHARE:.0%}): sharded"


def place_model(model: nn.Module, requested: str, ctx: Context, routing: bool = False, offload: str = "none",
                adapter_state: str = "shard", full: bool = False) -> str:
    """Choose the mode (logged with why) and move the model where it trains: DDP to this rank's device; FSDP
    leaves it where it is (fully_shard moves each shard to the device). FSDP's options are refused, in one line,
    where the mode cannot apply them (fsdp.check_options)."""
    from lorakit.train.fsdp import check_options

    mode, why = choose_parallel(requested, model, ctx)
    if routing and mode != "none":
        raise ValueError("the mixture router trains in one process; run train-router without torchrun")
    check_options(mode, offload, adapter_state, full)
    if mode != "none":
        log.info("parallel: %s over %d processes (%s)", mode, ctx.world, why)
    if mode == "ddp":
        model.to(ctx.device)
    return mode


# where tensors live or which are recomputed, not what is computed: a run resumes under other settings of these
PLACEMENT = ("parallel", "offload", "adapter_state", "activation_memory_budget")


def echo(train: dict, ctx: Context) -> dict:
    """A run's train settings as its checkpoint records them: the rows of a global micro-batch instead of the
    per-rank batch size, and no placement (parallel mode, offload, adapter state, the compiled layers' memory
    budget), so the run resumes on another number of processes or placement."""
    return {**{k: v for k, v in train.items() if k not in PLACEMENT}, "batch_size": train["batch_size"] * ctx.world}


def all_targets(batch: dict) -> dict:
    """A micro-batch without targets made into one where every token a row can predict is a target (its loss is
    then weighted zero; only the collectives need it). Padded rows: each led by a copy of its first token. Packed
    rows (seq_lens): every token after a segment's first, same width (a compiled shape stays a known one); only
    where every segment is one token long is the first segment led by a copy of its first token."""
    ids = batch["input_ids"]
    if "seq_lens" not in batch:
        ids = torch.cat([ids[:, :1], ids], 1)                                                   # (b, s + 1)
        mask = torch.cat([batch["attention_mask"][:, :1], batch["attention_mask"]], 1)         # still right-padded
        return {**batch, "input_ids": ids, "attention_mask": mask, "unpadded": bool(mask.all()),
                "labels": ids.masked_fill(mask == 0, IGNORE), "n_targets": int(mask[:, 1:].sum())}
    lens = list(batch["seq_lens"])
    pos = batch["position_ids"]
    if max(lens) < 2:
        ids, lens = torch.cat([ids[:, :1], ids], 1), [lens[0] + 1, *lens[1:]]
        pos = torch.cat([torch.arange(n) for n in lens]).view(1, -1).to(pos.device)
    labels = ids.masked_fill(pos == 0, IGNORE)                   # a segment's first token is predicted by nothing
    scored = tuple((labels[0, 1:] != IGNORE).nonzero()[:, 0].tolist())
    return {**batch, "input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": tuple(lens),
            "target_pos": scored, "n_targets": len(scored)}


class _Loss(nn.Module):
    """The root the engines wrap: its forward is a micro-batch's loss through the backend (or, with `fn`, any
    computation that must run inside the root, such as an eval forward under FSDP)."""

    def __init__(self, model: nn.Module, backend):
        super().__init__()
        self.model = model
        self.backend = backend  # a plain object (not a submodule)

    def forward(self, batch, denom, fn=None):
        return fn() if fn is not None else self.backend.loss(batch, denom)


class Runner:
    """The loop's handle on the model across ranks: loss, gradient sync, reductions, eval calls."""

    def __init__(self, model: nn.Module, backend, mode: str, ctx: Context, offload: bool = False,
                 replicate: bool = False):
        self.model, self.backend, self.mode, self.ctx = model, backend, mode, ctx
        self.offload, self.replicate = offload and mode == "fsdp", replicate and mode == "fsdp"
        self.root = _Loss(model, backend)
        self.read_sharded = 0  # base weights read from the checkpoint shard by shard (train/shard_load.py)
        self.replicated: list[nn.Parameter] = []  # FSDP's ignored trainable tensors (--adapter-state replicate)
        self.engine = self.root
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if getattr(getattr(backend, "fm", None), "compiled", False):
                import torch._dynamo.config as dc

                dc.optimize_ddp = False  # the compiled graphs are single layers already: no bucket splitting
            import inspect

            cuda = ctx.device.type == "cuda"
            # buffers (rotary tables, a 4-bit base's codes) are equal on every rank: never re-sent each forward
            quiet = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                     else "broadcast_buffers": False}
            self.engine = DDP(self.root, device_ids=[ctx.device] if cuda else None, gradient_as_bucket_view=True,
                              find_unused_parameters=False, **quiet)
        elif mode == "fsdp":
            from lorakit.train import fsdp

            self.read_sharded, self.replicated = fsdp.shard(model, self.root, ctx.device, ctx.world, self.offload,
                                                            self.replicate)
            if self.read_sharded:
                log.info("fsdp: %d base weights read shard by shard", self.read_sharded)
            if self.offload:
                log.info("fsdp: shards, their gradients and AdamW state in host memory (CPU offload)")
        elif mode != "none":
            raise ValueError(f"unknown parallel mode {mode!r}")

    def loss(self, batch: dict, denom: float) -> torch.Tensor:
        """This rank's share of the global loss (summed token loss / denom, times world for the engines'
        gradient average). A rank whose micro-batch has no target runs a real forward and backward anyway (the
        engines' collectives need every rank): its rows, each led by a copy of its first token so that every row
        predicts at least one, with every token a target, weighted zero."""
        if self.ctx.world > 1 and batch["n_targets"] == 0:
            return self.engine(all_targets(batch), 1.0)[0] * 0.0
        return self.engine(batch, denom / self.ctx.world)[0]

    def sync_grads(self) -> None:
        """After a step's last backward: the replicated adapters' gradients averaged over ranks (train/fsdp.py)."""
        if self.replicated and self.ctx.world > 1:
            from lorakit.train.fsdp import sync_replicated

            sync_replicated(self.replicated, self.ctx.world)

    def no_sync(self, last: bool):
        """DDP: no all-reduce on micro-batches before the last of a step (FSDP reduce-scatters each one: its
        gradients then accumulate sharded, which keeps memory down)."""
        if self.mode == "ddp" and not last:
            return self.engine.no_sync()
        return contextlib.nullcontext()

    def call(self, fn):
        """fn() inside the root (FSDP gathers the root's weights for it), e.g. an eval forward."""
        if self.mode != "fsdp":
            return fn()
        out = self.engine(None, None, fn=fn)
        self.root.reshard()
        return out

    def mean(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Per-rank loss shares -> the global batch's loss."""
        if self.ctx.world > 1:
            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum)
            loss_sum /= self.ctx.world
        return loss_sum

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        if max_norm <= 0:
            return torch.zeros(())
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def held(self) -> dict:
        """FSDP: the bytes of the model's weights (parameters and buffers), whole and on this rank, and of those
        the 4-bit base's (FlatNF4Weight storage): {"sharded": {...}}, what a run's train_config.json records;
        {} without FSDP."""
        if self.mode != "fsdp":
            return {}
        from lorakit.core.nf4 import NF4Weight

        nf4 = {id(p) for m in self.model.modules() if isinstance(m, NF4Weight) for p in m.parameters()}
        out = {"bytes": 0, "bytes_rank": 0, "nf4_bytes": 0, "nf4_bytes_rank": 0, "nf4_weights": len(nf4),
               "read_shard_by_shard": self.read_sharded, "offload": self.offload,
               "adapter_state": "replicate" if self.replicate else "shard",
               "replicated_bytes": sum(p.numel() * p.element_size() for p in self.replicated)}
        seen = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            whole = t.numel() * t.element_size()
            local = t.to_local() if hasattr(t, "to_local") else t
            here = local.numel() * local.element_size()
            out["bytes"] += whole
            out["bytes_rank"] += here
            if id(t) in nf4:
                out["nf4_bytes"] += whole
                out["nf4_bytes_rank"] += here
        return {"sharded": out}

    def peaks(self) -> dict:
        """CUDA memory peaks since the last call (allocated, reserved; GiB), the largest over ranks; {} on CPU."""
        device = self.ctx.device or next(self.model.parameters()).device
        if device.type != "cuda":
            return {}
        t = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64, device=device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        if self.ctx.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        alloc, reserved = t.tolist()
        return {"cuda_peak_alloc_gib": round(alloc, 3), "cuda_peak_reserved_gib": round(reserved, 3)}


# ---------------------------------------------------------------- full tensors for checkpoints and files
def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered whole on every rank (a collective: all ranks call it in the same
    order); any other tensor as is."""
    if not hasattr(t, "full_tensor"):
        return t
    with torch.no_grad():
        return t.detach().full_tensor()


def place(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `like`: this rank's shard where `like` is a DTensor (its local part where like's
    is: in host memory under FSDP's CPU offload, though the mesh is on the GPU), else on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = distribute_tensor(value.to(dtype=like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        if out.to_local().device != like.to_local().device:
            out = DTensor.from_local(out.to_local().to(like.to_local().device), like.device_mesh, like.placements,
                                     run_check=False, shape=like.shape, stride=like.stride())
        return out
    return value.to(like.device)


@contextlib.contextmanager
def whole_params(model: nn.Module, params: dict, ctx: Context):
    """Within: on rank 0 the model's sharded `params` are replaced by their full tensors (on CPU), so the
    ordinary save functions write them; every rank must enter (the gathering is a collective)."""
    sharded = [p for p in params.values() if hasattr(p, "full_tensor")]
    if not sharded:
        yield
        return
    whole = {id(p): full(p).cpu() for p in sharded}
    swapped = []
    if ctx.main:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and id(p) in whole:
                    mod._parameters[name] = nn.Parameter(whole[id(p)], requires_grad=False)
                    swapped.append((mod, name, p))
    try:
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
