"""The one training loop: LoRA, DoRA, rsLoRA, QLoRA (a 4-bit base), full fine-tuning and the mixture router.

`train` is a recipe: named setup steps, each a screen, in the order they run (model, adapters, backend, data,
optimizer and schedule, resume, metrics: train/setup_steps.py; what they build lives in one `TrainRun`), then the step loop (`run_steps`,
one `optimizer_step` at a time) and the outputs. AdamW, linear warmup then cosine decay, gradient accumulation (the
loss normalised over the target tokens of the whole step, so accumulation equals a bigger batch), clipping,
periodic eval, metrics as JSONL, atomic checkpoints every N steps, and resume that reproduces the uninterrupted run.

The loss of a micro-batch comes from a backend (backends.py, the `Backend` protocol): `plain` (the model's own
forward) or `fast` (train/fast: fused Llama layers, compiled on CUDA); `auto` takes fast on CUDA where it can and
says why not otherwise. Everything else is shared: trainable adapter tensors are fp32 master weights (compute stays
in the model's dtype), one AdamW set-up, one schedule, one checkpoint format, one metrics file. Under torchrun the
same loop runs on every rank (train/distributed.py: DDP or FSDP2); `batch_size` is per rank.

`out_dir` is a run folder (lorakit/runs.py names its files): the adapter (PEFT layout), the router or, with full
fine-tuning, a Hugging Face model directory; the metrics, the configuration, the checkpoint while unfinished.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit import runs
from lorakit.adapters.peft_files import save_adapter
from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.inject import set_routing
from lorakit.files import atomic_write_json
from lorakit.train import distributed
from lorakit.train.backends import Backend
from lorakit.train.checkpoint import save_checkpoint, save_full_model
from lorakit.train.data import Example
from lorakit.train.evaluate import evaluate_loss
from lorakit.train.setup_steps import (TrainRun, setup_adapters, setup_backend, setup_data, setup_metrics,
                                       setup_model, setup_optimizer, setup_resume)

log = logging.getLogger("lorakit.train")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0  # all tokens processed (prompt + target)
    seconds: float = 0.0
    trainable: int = 0
    total: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warmup to base_lr over `warmup` steps, then cosine to zero at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model, tok, train_examples: list[Example], out_dir: str | Path, lora: LoraConfig | None = None,
          cfg: TrainConfig | None = None, eval_examples: list[Example] | None = None, resume: bool = False,
          progress: bool = True, base_name: str | None = None, metadata: dict | None = None,
          on_step: Callable[[int, float], None] | None = None, save_final: bool = True,
          router=None, backend: Backend | None = None) -> TrainResult:
    """Fine-tune `model` in place and write `out_dir`: LoRA adapter "default" (DoRA/rsLoRA per `lora`; a QLoRA
    base is simply a model loaded with quant="nf4"), every weight with cfg.full, or only `router` (a
    core.mixture.Router over the model's frozen adapters). cfg.backend picks how the loss is computed; `backend` is
    another loss (train/diffusion.py) whose micro_batches(...) cut the examples (images: `tokens` counts them)."""
    cfg, lora = cfg or TrainConfig(), lora or LoraConfig()
    if len(train_examples) == 0:  # rows, or a tensor of items (images) for a given backend
        raise ValueError("no training examples")
    with _memory_budget(cfg.activation_memory_budget):  # compiled layers' saved activations (compiled in setup)
        run = TrainRun(model, tok, Path(out_dir), cfg, lora, router)
        _run(run, backend, eval_examples, train_examples, resume, progress, on_step)
    save_outputs(run, save_final, base_name, metadata)
    return run.result


@contextlib.contextmanager
def _memory_budget(budget: float):
    """torch.compile's partitioner keeps at most `budget` of what it would save for backward, for this run."""
    fc = torch._functorch.config
    saved = fc.activation_memory_budget
    fc.activation_memory_budget = budget
    try:
        yield
    finally:
        fc.activation_memory_budget = saved


def _run(run: TrainRun, backend, eval_examples, train_examples, resume, progress, on_step) -> None:
    setup_model(run)                              # processes, threads, seed, where the weights live
    setup_adapters(run)                           # what trains: the adapter, the router or every weight
    setup_backend(run, backend, eval_examples)    # how a micro-batch's loss is computed (and run under DDP/FSDP)
    setup_data(run, train_examples)               # micro-batches, number of steps, the run's configuration
    setup_optimizer(run)                          # AdamW over the trained tensors; warmup + cosine schedule
    run.result = TrainResult(run.out_dir, 0, trainable=run.trainable, total=run.total)
    setup_resume(run, resume)                     # a checkpoint's step, tensors, optimizer state and metrics
    setup_metrics(run)                            # train_config.json and metrics.jsonl (rank 0)
    try:
        run_steps(run, eval_examples, progress, on_step)
    finally:
        release_backend(run)


# ---------------------------------------------------------------- the step loop
def run_steps(run: TrainRun, eval_examples, progress: bool, on_step) -> None:
    """From the first (or resumed) step to the last: an optimizer step, its metrics line, a held-out eval and a
    checkpoint when due; then the final held-out eval."""
    cfg, ctx, result = run.cfg, run.ctx, run.result
    bar = _progress_bar(run) if progress and ctx.main else None
    run.model.train()
    if run.router is not None:
        run.router.train()
    run.runner.peaks()
    t0 = time.perf_counter()
    run.tokens, last_eval = run.done_tokens, None
    with (run.out_dir / runs.METRICS if ctx.main else Path(os.devnull)).open("a") as mlog:
        for step in range(run.start_step, run.total_steps):
            rec = optimizer_step(run, step, t0)
            result.losses.append(rec["loss"])
            done, last = step + 1, step + 1 == run.total_steps
            if eval_examples and cfg.eval_every and done % cfg.eval_every == 0 and not last:
                ev = evaluate_loss(run.model, eval_examples, run.pad_id, cfg.batch_size, call=run.runner.call)
                rec.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
                result.evals.append(rec)
                last_eval = ev["loss"]
                log.info("step %d: eval loss %.4f (ppl %.2f)", done, ev["loss"], ev["ppl"])
            mlog.write(json.dumps(rec) + "\n")
            mlog.flush()
            if bar:
                _show(bar, rec, last_eval)
            if cfg.save_every and done % cfg.save_every == 0 and not last:
                save_checkpoint(run.out_dir, done, {"tokens": run.tokens, "seconds": rec["seconds"],
                                                    "config": run.config_echo}, run.params, run.opt, write=ctx.main)
            if on_step:
                on_step(done, rec["loss"])
        if bar:
            bar.close()
        result.steps = run.total_steps
        result.tokens = run.tokens - run.done_tokens
        result.seconds = time.perf_counter() - t0
        if eval_examples:
            ev = evaluate_loss(run.model, eval_examples, run.pad_id, cfg.batch_size, call=run.runner.call)
            rec = {"step": run.total_steps, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}
            result.evals.append(rec)
            mlog.write(json.dumps(rec) + "\n")
            log.info("final eval loss %.4f (ppl %.2f)", ev["loss"], ev["ppl"])


def optimizer_step(run: TrainRun, step: int, t0: float) -> dict:
    """One optimizer step over grad_accum micro-batches (the loss normalised by the whole step's target count) ->
    its metrics record."""
    cfg, mb, runner = run.cfg, run.batches, run.runner
    lr = lr_at(step, run.total_steps, run.warmup, cfg.lr)
    for g in run.opt.param_groups:
        g["lr"] = lr
    micro = [step * cfg.grad_accum + k for k in range(cfg.grad_accum)]
    rows = [j for m in micro for j in mb.indices(m)]  # the global step's rows, all ranks
    denom = max(1, sum(mb.targets[j] for j in rows))  # counted on the host: no device sync
    loss_sum = torch.zeros((), device=run.device)
    for k, m in enumerate(micro):
        b = mb.get(m)  # this rank's rows
        n_targets = mb.count(b)
        unpadded = "attention_mask" not in b or bool(b["attention_mask"].all())
        b = {key: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for key, v in b.items()}
        b["n_targets"], b["unpadded"] = n_targets, unpadded
        with runner.no_sync(last=k == len(micro) - 1):
            loss = runner.loss(b, denom)
            loss.backward()
        loss_sum += loss.detach()
    run.tokens += sum(mb.lengths[j] for j in rows)
    runner.sync_grads()  # replicated adapters under FSDP: one all-reduce a step
    gnorm = runner.clip(list(run.params.values()), cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    loss_f, gnorm_f = (float(v) for v in torch.stack([runner.mean(loss_sum), gnorm.to(loss_sum)]).cpu())
    secs = run.done_secs + time.perf_counter() - t0
    return {"step": step + 1, "loss": loss_f, "lr": lr, "grad_norm": gnorm_f, "tokens": run.tokens,
            "tokens_per_s": (run.tokens - run.done_tokens) / max(secs - run.done_secs, 1e-9), "seconds": secs,
            "backend": run.backend.name, **runner.peaks()}


# ---------------------------------------------------------------- the end
def release_backend(run: TrainRun) -> None:
    """Undo what the backend (and a router's routing hook) changed in the model; runs even if a step failed."""
    run.backend.close()
    if run.router is not None:
        set_routing(run.model, None)
        run.router.eval()


def save_outputs(run: TrainRun, save_final: bool, base_name: str | None, metadata: dict | None) -> None:
    """The trained adapter (or router, or full model), then train_done.json; the checkpoint is no longer needed."""
    ctx, out_dir, result, model = run.ctx, run.out_dir, run.result, run.model
    model.eval()
    with distributed.whole_params(model, run.params if save_final else {}, ctx):  # FSDP: full tensors on rank 0
        if save_final and ctx.main:
            meta = {**(metadata or {}), "steps": run.total_steps, "backend": run.backend.name,
                    "final_loss": result.losses[-1] if result.losses else None}
            if run.router is not None:
                run.router.save(out_dir)
            elif run.cfg.full:
                save_full_model(model, run.tok, out_dir)
            else:
                save_adapter(model, out_dir, "default", base_name=base_name, metadata=meta)
    if ctx.main:
        atomic_write_json(out_dir / runs.DONE, {"steps": run.total_steps, "final_loss": result.losses[-1],
                                                "evals": result.evals, "trainable": run.trainable,
                                                "total": run.total, "backend": run.backend.name})
        shutil.rmtree(out_dir / runs.CHECKPOINT, ignore_errors=True)
    distributed.barrier(ctx)  # the run's files are complete when train returns on any rank


def _progress_bar(run: TrainRun):
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True)


def _show(bar, rec: dict, last_eval: float | None) -> None:
    post = {"loss": f"{rec['loss']:.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}
    if last_eval is not None:
        post["eval"] = f"{last_eval:.4f}"
    bar.set_postfix(post)
    bar.update(1)
