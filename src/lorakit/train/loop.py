"""The one training loop: LoRA, DoRA, rsLoRA, QLoRA (a 4-bit base), full fine-tuning and the mixture router.

AdamW, linear warmup then cosine decay, gradient accumulation (loss normalised over the target tokens
of the whole accumulated batch, so accumulation equals a bigger batch), gradient clipping, periodic eval,
metrics as JSONL, atomic checkpoints every N steps, and resume that reproduces the uninterrupted run.

The loss of a micro-batch comes from a backend (backends.py): `plain` (the model's own forward) or `fast`
(train/fast: fused Llama layers, compiled on CUDA); `auto` takes fast on CUDA where it can and says why not
otherwise. Everything else is shared: trainable adapter tensors are fp32 master weights (compute stays in the
model's dtype), one AdamW set-up, one schedule, one checkpoint format, one metrics file.

Under torchrun the same loop runs on every rank (train/distributed.py: DDP or FSDP2). `batch_size` is per rank: a
step's batch_size x grad_accum x world rows, order, loss and gradients are one process's at batch_size x world.

Output directory (`out_dir`): the adapter files (PEFT layout), the router files, or, with full fine-tuning, a
Hugging Face model directory; `metrics.jsonl`; `train_config.json`; `checkpoint/` while a run is unfinished.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit.adapters.peft_files import save_adapter
from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.inject import add_adapter, adapter_configs, count_params, mark_trainable, set_active, trainable_report
from lorakit import faults, runs
from lorakit.files import atomic_write_json, atomic_write_text
from lorakit.models import usable_cores
from lorakit.train import distributed, packing
from lorakit.train.backends import causal_lm_loss, choose_backend
from lorakit.train.checkpoint import CKPT, load_checkpoint, recover_run, save_checkpoint, save_full_model
from lorakit.train.data import IGNORE, Example, collate

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


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, call=None) -> dict:
    """Mean loss per target token and perplexity. `call(fn)` runs each forward (a Runner's, under FSDP)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        loss, n = (call or (lambda f: f()))(lambda: causal_lm_loss(model, batch, denom=1.0))
        total += float(loss)
        count += n
    model.train(was)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


class MicroBatches:
    """Micro-batch number m -> the same batch every time (epoch order seeded by (seed, epoch)).

    group_by_length: each epoch's shuffled order is cut into windows of `window` optimizer batches (`unit` rows:
    batch size x accumulation steps); each window is sorted by length and its batches are shuffled again. Rows of a
    batch then have similar lengths, so little compute goes to padding, the epoch order stays random at the scale
    of windows, and an optimizer step sees the same rows however it is split into micro-batches.

    With `world` ranks a micro-batch is global (batch_size x world rows) and `get` returns rank `rank`'s share;
    a rank left without rows (a short last micro-batch) gets one row with no target."""
    count = staticmethod(lambda batch: int((batch["labels"][:, 1:] != IGNORE).sum()))  # a batch's target tokens

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 group_by_length: bool = False, window: int = 32, unit: int | None = None,
                 rank: int = 0, world: int = 1, pack: bool = False):
        import random

        self.pack, self.widths = pack, None  # packed rows (train/packing.py); the allowed packed widths
        self.examples, self.bs, self.seed, self.pad = examples, batch_size * world, seed, pad_id
        self.group, self.window, self.unit = group_by_length, window, unit or batch_size * world
        self.rank, self.world = rank, world
        self.per_epoch = math.ceil(len(examples) / self.bs)
        self.targets = [sum(lab != IGNORE for lab in e.labels[1:]) for e in examples]
        self.lengths = [len(e.input_ids) for e in examples]
        self._rand = random.Random
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            rng = self._rand(self.seed * 100_003 + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.group:
                span = self.unit * self.window
                grouped = []
                for w in range(0, len(order), span):
                    part = sorted(order[w:w + span], key=lambda j: len(self.examples[j].input_ids))
                    chunks = [part[i:i + self.unit] for i in range(0, len(part), self.unit)]
                    rng.shuffle(chunks)
                    grouped += [j for c in chunks for j in c]
                order = grouped
            self._orders = {epoch: order}
        return self._orders[epoch]

    def indices(self, m: int) -> list[int]:
        """The rows of global micro-batch m."""
        epoch, i = divmod(m, self.per_epoch)
        return self.order(epoch)[i * self.bs:(i + 1) * self.bs]

    def part(self, m: int) -> list[int]:  # this rank's rows of micro-batch m
        idx = self.indices(m)
        return idx[self.rank * len(idx) // self.world:(self.rank + 1) * len(idx) // self.world]

    def get(self, m: int) -> dict[str, torch.Tensor]:
        faults.point("train.micro_batch", m)
        part = self.part(m)
        rows = [self.examples[j] for j in part or self.indices(m)[:1]]
        batch = packing.micro_batch(rows, self.pad, self.widths) if self.pack else collate(rows, self.pad)
        if not part:
            batch["labels"].fill_(IGNORE)
        return batch


def trim_to_targets(examples: list[Example]) -> list[Example]:
    """Drop the tokens after each row's last target token: nothing is predicted from them."""
    out = []
    for e in examples:
        last = max((i for i, lab in enumerate(e.labels) if lab != IGNORE), default=len(e.labels) - 1)
        out.append(e if last == len(e.labels) - 1 else Example(e.input_ids[:last + 1], e.labels[:last + 1]))
    return out


def set_threads(threads: int) -> int:
    """Torch CPU threads: `threads` if > 0, else the cores this process may use (physical ones where known)."""
    if threads <= 0:
        threads = usable_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


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


def _setup_trainable(model, lora: LoraConfig, cfg: TrainConfig, router) -> dict[str, torch.nn.Parameter]:
    """Make exactly the tensors this run trains require grad (adapter, router or every weight); -> them by name."""
    if router is not None:
        if cfg.full:
            raise ValueError("a router trains alone over frozen adapters: full=True does not apply")
        for p in model.parameters():
            p.requires_grad_(False)
        router.to(next(model.parameters()).device)
        for p in router.parameters():
            p.requires_grad_(True)
        router.attach(model)
        return dict(router.named_parameters(prefix="router"))
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if "default" not in adapter_configs(model):
            add_adapter(model, lora, "default")
        else:
            set_active(model, "default")
            mark_trainable(model, "default")
        _fp32_masters(model)
    return _trainable(model)


def train(model, tok, train_examples: list[Example], out_dir: str | Path, lora: LoraConfig | None = None,
          cfg: TrainConfig | None = None, eval_examples: list[Example] | None = None, resume: bool = False,
          progress: bool = True, base_name: str | None = None, metadata: dict | None = None,
          on_step: Callable[[int, float], None] | None = None, save_final: bool = True,
          router=None, backend=None) -> TrainResult:
    """Fine-tune `model` in place and write `out_dir`: LoRA adapter "default" (DoRA/rsLoRA per `lora`; a QLoRA
    base is simply a model loaded with quant="nf4"), every weight with cfg.full, or only `router` (a
    core.mixture.Router over the model's frozen adapters). cfg.backend picks how the loss is computed; `backend` is
    another loss (train/diffusion.py) whose micro_batches(...) cut the examples (images: `tokens` counts them)."""
    cfg = cfg or TrainConfig()
    lora = lora or LoraConfig()
    if len(train_examples) == 0:  # rows, or a tensor of items (images) for a given backend
        raise ValueError("no training examples")
    out_dir = Path(out_dir)
    ctx = distributed.context()  # one process, or this rank of a torchrun group
    threads = set_threads(cfg.threads or distributed.default_threads(ctx))
    torch.manual_seed(cfg.seed)
    mode = distributed.place_model(model, cfg.parallel, ctx, routing=router is not None)
    device = ctx.device or next(model.parameters()).device
    params = _setup_trainable(model, lora, cfg, router)
    if backend is not None and eval_examples:
        raise ValueError(f"held-out eval examples are for the text backends, not the {backend.name!r} backend")
    prefix_off = ("turned off (--no-share-prefix)" if not cfg.share_prefix else
                  "several processes" if ctx.world > 1 else
                  "a router trains on the adapters' per-token mix" if router is not None else "")
    backend, why = (backend, "given by the caller") if backend is not None else \
        choose_backend(model, cfg.backend, recompute=cfg.recompute, routing=router is not None, device=device,
                       share_prefix=not prefix_off, prefix_off=prefix_off, fused_mlp=cfg.fused_mlp)
    log.info("backend: %s (%s)", backend.name, why)
    if router is not None:
        trainable = sum(p.numel() for p in params.values())
        total = trainable + sum(p.numel() for p in model.parameters())
    else:
        trainable, total = count_params(model)
    runner = distributed.Runner(model, backend, mode, ctx)
    if mode == "fsdp":
        params = _trainable(model)  # FSDP replaced each parameter by its shard
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            fused=device.type == "cuda")
    pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    mb = (backend.micro_batches(train_examples, cfg, ctx.rank, ctx.world) if hasattr(backend, "micro_batches")
          else MicroBatches(trim_to_targets(train_examples), cfg.batch_size, cfg.seed, pad_id, cfg.group_by_length,
                            unit=cfg.batch_size * cfg.grad_accum * ctx.world, rank=ctx.rank, world=ctx.world,
                            pack=cfg.pack and getattr(backend, "pack", False)))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * mb.per_epoch / cfg.grad_accum))
    packing.setup(mb, backend, cfg, ctx.world, range(total_steps * cfg.grad_accum), pad_id)
    warmup = int(cfg.warmup_ratio * total_steps)
    what = "router" if router is not None else "full" if cfg.full else "lora"
    config_echo = {"lora": lora.to_dict() if what == "lora" else None, "train": distributed.echo(asdict(cfg), ctx),
                   "total_steps": total_steps, "n_train": len(train_examples), "what": what}
    if router is not None:
        config_echo["router"] = {"adapters": router.names, "temperature": router.temperature}
    metrics_path = out_dir / runs.METRICS
    result = TrainResult(out_dir, 0, trainable=trainable, total=total)
    start_step, done_tokens, done_secs = 0, 0, 0.0
    history: list[dict] = []
    if resume:  # rank 0 tidies what a kill -9 mid-write may have left, before any rank reads
        recover_run(out_dir, ctx.main, runs.METRICS, runs.CONFIG, runs.DONE) or distributed.barrier(ctx)
    if resume and (out_dir / CKPT / "state.json").exists():
        state = load_checkpoint(out_dir, params, opt)
        if state["config"] != json.loads(json.dumps(config_echo)):
            raise ValueError(f"cannot resume {str(out_dir)!r}: its checkpoint was made with another configuration "
                             f"({state['config']}); pass the same options or a new output directory")
        start_step, done_tokens, done_secs = state["step"], state["tokens"], state["seconds"]
        history = _read_metrics(metrics_path, start_step)
        result.losses = [r["loss"] for r in history if "loss" in r]
        result.evals = [r for r in history if "eval_loss" in r]
        log.info("resumed from step %d of %d (%s)", start_step, total_steps, out_dir)
    elif resume and (out_dir / runs.DONE).exists():
        raise ValueError(f"{str(out_dir)!r} holds a finished run; nothing to resume")
    elif resume:
        log.info("no checkpoint in %r; starting from step 0", str(out_dir))
    distributed.barrier(ctx)  # every rank has read what it needs before rank 0 writes
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / runs.DONE).unlink(missing_ok=True)
        atomic_write_json(out_dir / runs.CONFIG, {
            **config_echo, "backend": backend.name, "backend_reason": why, "threads": threads, "world": ctx.world,
            "parallel": mode, "batch_size_per_rank": cfg.batch_size, **runner.held()})
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    log.info("%s: %s", {"router": "router", "full": "full fine-tuning", "lora": "LoRA"}[what],
             f"trainable params: {trainable:,} of {total:,}" if router is not None else trainable_report(model))

    bar = None
    if progress and ctx.main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    if router is not None:
        router.train()
    runner.peaks()
    t0 = time.perf_counter()
    tokens = done_tokens
    last_eval = None
    try:
        with (metrics_path if ctx.main else Path(os.devnull)).open("a") as mlog:
            for step in range(start_step, total_steps):
                lr = lr_at(step, total_steps, warmup, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                micro = [step * cfg.grad_accum + k for k in range(cfg.grad_accum)]
                rows = [j for m in micro for j in mb.indices(m)]  # the global step's rows, all ranks
                denom = max(1, sum(mb.targets[j] for j in rows))  # counted on the host: no device sync
                step_tokens = sum(mb.lengths[j] for j in rows)
                loss_sum = torch.zeros((), device=device)
                for k, m in enumerate(micro):
                    b = mb.get(m)  # this rank's rows
                    n_targets = mb.count(b)
                    unpadded = "attention_mask" not in b or bool(b["attention_mask"].all())
                    b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                    b["n_targets"], b["unpadded"] = n_targets, unpadded
                    with runner.no_sync(last=k == len(micro) - 1):
                        loss = runner.loss(b, denom)
                        loss.backward()
                    loss_sum += loss.detach()
                tokens += step_tokens
                gnorm = runner.clip(list(params.values()), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_f, gnorm_f = (float(v) for v in torch.stack([runner.mean(loss_sum), gnorm.to(loss_sum)]).cpu())
                secs = done_secs + time.perf_counter() - t0
                rec = {"step": step + 1, "loss": loss_f, "lr": lr, "grad_norm": gnorm_f, "tokens": tokens,
                       "tokens_per_s": (tokens - done_tokens) / max(secs - done_secs, 1e-9), "seconds": secs,
                       "backend": backend.name, **runner.peaks()}
                result.losses.append(loss_f)
                if eval_examples and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
                    ev = evaluate_loss(model, eval_examples, pad_id, cfg.batch_size, call=runner.call)
                    rec.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
                    result.evals.append(rec)
                    last_eval = ev["loss"]
                    log.info("step %d: eval loss %.4f (ppl %.2f)", step + 1, ev["loss"], ev["ppl"])
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                if bar:
                    post = {"loss": f"{loss_f:.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}
                    if last_eval is not None:
                        post["eval"] = f"{last_eval:.4f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                    save_checkpoint(out_dir, step + 1, {"tokens": tokens, "seconds": secs, "config": config_echo},
                                     params, opt, write=ctx.main)
                if on_step:
                    on_step(step + 1, loss_f)
            if bar:
                bar.close()
            result.steps = total_steps
            result.tokens = tokens - done_tokens
            result.seconds = time.perf_counter() - t0
            if eval_examples:
                ev = evaluate_loss(model, eval_examples, pad_id, cfg.batch_size, call=runner.call)
                rec = {"step": total_steps, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}
                result.evals.append(rec)
                mlog.write(json.dumps(rec) + "\n")
                log.info("final eval loss %.4f (ppl %.2f)", ev["loss"], ev["ppl"])
    finally:
        backend.close()
        if router is not None:
            from lorakit.core.inject import set_routing

            set_routing(model, None)
            router.eval()
    model.eval()
    with distributed.whole_params(model, params if save_final else {}, ctx):  # FSDP: full tensors on rank 0 (all ranks gather)
        if save_final and ctx.main:
            meta = {**(metadata or {}), "steps": total_steps, "backend": backend.name,
                    "final_loss": result.losses[-1] if result.losses else None}
            if router is not None:
                router.save(out_dir)
            elif cfg.full:
                save_full_model(model, tok, out_dir)
            else:
                save_adapter(model, out_dir, "default", base_name=base_name, metadata=meta)
    if ctx.main:
        atomic_write_json(out_dir / runs.DONE, {"steps": total_steps, "final_loss": result.losses[-1],
                                            "evals": result.evals, "trainable": trainable, "total": total,
                                            "backend": backend.name})
        shutil.rmtree(out_dir / CKPT, ignore_errors=True)
    distributed.barrier(ctx)  # the run's files are complete when train returns on any rank
    return result

