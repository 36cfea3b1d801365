"""The training loop's setup steps (train/loop.py runs them in this order, then the step loop). Each builds one part
of the `TrainRun` and is about a screen: where the model runs (`setup_model`), what trains (`setup_adapters`), how a
micro-batch's loss is computed (`setup_backend`), the micro-batches and the number of steps (`setup_data`), AdamW
and its schedule (`setup_optimizer`), a checkpoint to resume from (`setup_resume`), and the run folder's
configuration and metrics files (`setup_metrics`)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lorakit import runs
from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.inject import add_adapter, adapter_configs, count_params, mark_trainable, set_active, trainable_report
from lorakit.files import atomic_write_json, atomic_write_text
from lorakit.models import set_threads
from lorakit.train import distributed, packing
from lorakit.train.backends import Backend, MicroBatchSource, choose_backend
from lorakit.train.batches import MicroBatches, trim_to_targets
from lorakit.train.checkpoint import load_checkpoint, recover_run

log = logging.getLogger("lorakit.train")


@dataclass
class TrainRun:
    """What the setup steps build, in groups in the order they build them (setup_model: ctx .. device; setup_adapters:
    params .. total; backend; data; optimizer; resume: result .. history), and the step loop's token count."""
    model: nn.Module
    tok: object
    out_dir: Path
    cfg: TrainConfig
    lora: LoraConfig
    router: object = None
    ctx: distributed.Context | None = None
    threads: int = 0
    mode: str = "single"  # "single" | "ddp" | "fsdp"
    device: torch.device | None = None
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # what the optimizer updates, by name
    what: str = "lora"  # "lora" | "full" | "router"
    trainable: int = 0
    total: int = 0
    backend: Backend | None = None
    why: str = ""
    runner: distributed.Runner | None = None
    pad_id: int = 0
    batches: MicroBatchSource | None = None
    total_steps: int = 0
    config_echo: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed
    opt: torch.optim.Optimizer | None = None
    warmup: int = 0
    result: object = None  # the loop's TrainResult (losses and evals so far: a resumed run's)
    start_step: int = 0
    done_tokens: int = 0
    done_secs: float = 0.0
    history: list[dict] = field(default_factory=list)
    tokens: int = 0



def setup_model(run: TrainRun) -> None:
    """This process (one, or a rank of a torchrun group), its CPU threads, the seed, and the model's placement."""
    run.ctx = distributed.context()
    run.threads = set_threads(run.cfg.threads or distributed.default_threads(run.ctx))
    torch.manual_seed(run.cfg.seed)
    run.mode = distributed.place_model(run.model, run.cfg.parallel, run.ctx, routing=run.router is not None,
                                       offload=run.cfg.offload, adapter_state=run.cfg.adapter_state,
                                       full=run.cfg.full)
    run.device = (run.ctx.device if run.mode != "none" else None) or next(run.model.parameters()).device


def setup_adapters(run: TrainRun) -> None:
    """Exactly the tensors this run trains require grad; their counts for the log and train_done.json."""
    model, router = run.model, run.router
    run.what = "router" if router is not None else "full" if run.cfg.full else "lora"
    if router is not None:
        if run.cfg.full:
            raise ValueError("a router trains alone over frozen adapters: full=True does not apply")
        for p in model.parameters():
            p.requires_grad_(False)
        router.to(next(model.parameters()).device)
        for p in router.parameters():
            p.requires_grad_(True)
        router.attach(model)
        run.params = dict(router.named_parameters(prefix="router"))
        run.trainable = sum(p.numel() for p in run.params.values())
        run.total = run.trainable + sum(p.numel() for p in model.parameters())
        return
    if run.cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    elif "default" not in adapter_configs(model):
        add_adapter(model, run.lora, "default")
    else:
        set_active(model, "default")
        mark_trainable(model, "default")
    if not run.cfg.full:
        _fp32_masters(model)
    run.params = _trainable(model)
    run.trainable, run.total = count_params(model)


def setup_backend(run: TrainRun, backend: Backend | None, eval_examples) -> None:
    """The backend (given, or chosen by cfg.backend: plain or fast, and why) and the runner that runs it in this
    process (DDP or FSDP wrap it under torchrun)."""
    cfg, ctx, routing = run.cfg, run.ctx, run.router is not None
    if backend is not None and eval_examples:
        raise ValueError(f"held-out eval examples are for the text backends, not the {backend.name!r} backend")
    prefix_off = ("turned off (--no-share-prefix)" if not cfg.share_prefix else
                  "several processes" if ctx.world > 1 else
                  "a router trains on the adapters' per-token mix" if routing else "")
    run.backend, run.why = (backend, "given by the caller") if backend is not None else \
        choose_backend(run.model, cfg.backend, recompute=cfg.recompute, routing=routing, device=run.device,
                       share_prefix=not prefix_off, prefix_off=prefix_off, fused_mlp=cfg.fused_mlp)
    log.info("backend: %s (%s)", run.backend.name, run.why)
    run.runner = distributed.Runner(run.model, run.backend, run.mode, ctx, offload=cfg.offload == "params",
                                    replicate=cfg.adapter_state == "replicate")
    if run.mode == "fsdp":
        run.params = _trainable(run.model)  # FSDP replaced each parameter by its shard


def setup_data(run: TrainRun, examples) -> None:
    """The micro-batches (the backend's own, or rows cut after their last target, packed where the backend takes
    packed rows: their widths chosen and compiled up front), the number of optimizer steps, and the configuration
    a checkpoint records."""
    cfg, ctx, tok = run.cfg, run.ctx, run.tok
    run.pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    if hasattr(run.backend, "micro_batches"):
        run.batches = run.backend.micro_batches(examples, cfg, ctx.rank, ctx.world)
    else:  # packed rows where the backend takes them and cfg.pack allows (train/packing.py)
        run.batches = MicroBatches(trim_to_targets(examples), cfg.batch_size, cfg.seed, run.pad_id,
                                   cfg.group_by_length, unit=cfg.batch_size * cfg.grad_accum * ctx.world,
                                   rank=ctx.rank, world=ctx.world,
                                   pack=cfg.pack and getattr(run.backend, "pack", False))
    run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.batches.per_epoch / cfg.grad_accum))
    packing.setup(run.batches, run.backend, cfg, ctx.world, range(run.total_steps * cfg.grad_accum), run.pad_id)
    run.config_echo = {"lora": run.lora.to_dict() if run.what == "lora" else None,
                       "train": distributed.echo(asdict(cfg), ctx), "total_steps": run.total_steps,
                       "n_train": len(examples), "what": run.what}
    if run.router is not None:
        run.config_echo["router"] = {"adapters": run.router.names, "temperature": run.router.temperature}


def setup_optimizer(run: TrainRun) -> None:
    """AdamW (weight decay on matrices only; fused where every trained tensor is on CUDA, so not on FSDP's
    offloaded shards, which step on the CPU) and the schedule's warmup steps (`lr_at`)."""
    cfg = run.cfg
    decay = [p for n, p in run.params.items() if p.ndim >= 2]
    no_decay = [p for n, p in run.params.items() if p.ndim < 2]
    on_cuda = all((p.to_local() if hasattr(p, "to_local") else p).is_cuda for p in run.params.values())
    run.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                fused=run.device.type == "cuda" and on_cuda)
    run.warmup = int(cfg.warmup_ratio * run.total_steps)


def setup_resume(run: TrainRun, resume: bool) -> None:
    """With `resume`: the last whole checkpoint's tensors, optimizer and RNG state, step, tokens, time and metrics
    (refused if it was made with another configuration, or if the run finished)."""
    out_dir, ctx = run.out_dir, run.ctx
    if not resume:
        return
    # rank 0 tidies what a kill -9 mid-write may have left, before any rank reads
    recover_run(out_dir, ctx.main, runs.METRICS, runs.CONFIG, runs.DONE) or distributed.barrier(ctx)
    if (out_dir / runs.CHECKPOINT / "state.json").exists():
        state = load_checkpoint(out_dir, run.params, run.opt)
        if state["config"] != json.loads(json.dumps(run.config_echo)):
            raise ValueError(f"cannot resume {str(out_dir)!r}: its checkpoint was made with another configuration "
                             f"({state['config']}); pass the same options or a new output directory")
        run.start_step, run.done_tokens, run.done_secs = state["step"], state["tokens"], state["seconds"]
        run.history = _read_metrics(out_dir / runs.METRICS, run.start_step)
        run.result.losses = [r["loss"] for r in run.history if "loss" in r]
        run.result.evals = [r for r in run.history if "eval_loss" in r]
        log.info("resumed from step %d of %d (%s)", run.start_step, run.total_steps, out_dir)
    elif (out_dir / runs.DONE).exists():
        raise ValueError(f"{str(out_dir)!r} holds a finished run; nothing to resume")
    else:
        log.info("no checkpoint in %r; starting from step 0", str(out_dir))


def setup_metrics(run: TrainRun) -> None:
    """Rank 0 starts the run folder: the run's configuration, the metrics so far (a resumed run's), no done file."""
    ctx, out_dir = run.ctx, run.out_dir
    distributed.barrier(ctx)  # every rank has read what it needs before rank 0 writes
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / runs.DONE).unlink(missing_ok=True)
        atomic_write_json(out_dir / runs.CONFIG, {
            **run.config_echo, "backend": run.backend.name, "backend_reason": run.why, "threads": run.threads,
            "world": ctx.world, "parallel": run.mode, "batch_size_per_rank": run.cfg.batch_size,
            **run.runner.held()})
        atomic_write_text(out_dir / runs.METRICS, "".join(json.dumps(r) + "\n" for r in run.history))
    log.info("%s: %s", {"router": "router", "full": "full fine-tuning", "lora": "LoRA"}[run.what],
             f"trainable params: {run.trainable:,} of {run.total:,}" if run.router is not None
             else trainable_report(run.model))


def _fp32_masters(model) -> None:
    """Trainable adapter tensors in float32 (the optimizer's small updates survive); compute keeps the model dtype."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    out: dict[str, torch.nn.Parameter] = {}  # named_parameters yields a shared (tied) tensor once
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = p
    return out


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= upto]
