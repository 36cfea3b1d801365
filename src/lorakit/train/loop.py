"""One readable training loop for LoRA and full fine-tuning.

AdamW, linear warmup then cosine decay, gradient accumulation (loss normalised over the target tokens
of the whole accumulated batch, so accumulation equals a bigger batch), gradient clipping, periodic eval,
metrics as JSONL, atomic checkpoints every N steps, and resume that reproduces the uninterrupted run.

Output directory (`out_dir`): the adapter files (PEFT layout) or, with full fine-tuning, a Hugging Face
model directory; `metrics.jsonl`; `train_config.json`; `checkpoint/` while a run is unfinished.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorakit.adapters.files import save_adapter
from lorakit.config import LoraConfig, TrainConfig
from lorakit.train.data import IGNORE, Example, collate
from lorakit.files import atomic_write_dir, atomic_write_json, atomic_write_text
from lorakit.core.inject import add_adapter, adapter_configs, count_params, mark_trainable, set_active, trainable_report

CKPT = "checkpoint"
DONE = "train_done.json"


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


# Architectures whose causal-LM head is exactly `lm_head(decoder(x).last_hidden_state)`: no logit scaling or
# soft-capping after the head. For these the loss computes logits only where there is a target token.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "starcoder2"}


def _body_and_head(model):
    """(decoder, head) when the logits can be computed on a subset of positions, else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD or not hasattr(model, "get_output_embeddings"):
        return None
    body, head = getattr(model, getattr(model, "base_model_prefix", ""), None), model.get_output_embeddings()
    if body is None or body is model or head is None:
        return None
    return body, head


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict a target token: (n, vocab) and (n,).

    The vocabulary projection runs only on those positions (for a chat or prompt/completion row, the
    completion): prompt positions never reach the head, which saves its matmul, the softmax over the
    vocabulary and their memory. The values equal the full logits' rows."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    parts = _body_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        body, head = parts
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    return logits, labels[keep]


def causal_lm_loss(model, batch: dict[str, torch.Tensor], denom: float | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens / denom (default: their count), and the count."""
    logits, targets = target_logits(model, batch)
    n = targets.numel()
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss / (denom if denom is not None else max(n, 1)), n


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    """Mean loss per target token and perplexity."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        loss, n = causal_lm_loss(model, batch, denom=1.0)
        total += float(loss)
        count += n
    model.train(was)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


class MicroBatches:
    """Micro-batch number m -> the same batch every time (epoch order seeded by (seed, epoch))."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        import random

        self.examples, self.bs, self.seed, self.pad = examples, batch_size, seed, pad_id
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._rand = random.Random
        self._orders: dict[int, list[int]] = {}

    def get(self, m: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(m, self.per_epoch)
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            self._rand(self.seed * 100_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        idx = self._orders[epoch][i * self.bs:(i + 1) * self.bs]
        return collate([self.examples[j] for j in idx], self.pad)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    seen, out = set(), {}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[n] = p
    return out


def _save_checkpoint(out_dir: Path, step: int, state: dict, params: dict, opt: torch.optim.Optimizer) -> None:
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{n}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()

    def write(tmp: Path):
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))

    atomic_write_dir(out_dir / CKPT, write)


def _load_checkpoint(out_dir: Path, params: dict, opt: torch.optim.Optimizer) -> dict:
    ck = out_dir / CKPT
    state = json.loads((ck / "state.json").read_text())
    tensors = load_file(str(ck / "state.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            key = f"param.{n}"
            if key not in tensors:
                raise ValueError(f"checkpoint {str(ck)!r} has no tensor for trainable parameter {n!r}")
            p.copy_(tensors[key])
            st = {k[len(f"opt.{n}."):]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
            if st:
                opt.state[p] = st
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= upto]


def train(model, tok, train_examples: list[Example], out_dir: str | Path, lora: LoraConfig | None = None,
          cfg: TrainConfig | None = None, eval_examples: list[Example] | None = None, resume: bool = False,
          progress: bool = True, base_name: str | None = None, metadata: dict | None = None,
          on_step: Callable[[int, float], None] | None = None, save_final: bool = True) -> TrainResult:
    """Fine-tune `model` in place (LoRA adapter "default", or every weight with cfg.full) and write `out_dir`."""
    cfg = cfg or TrainConfig()
    lora = lora or LoraConfig()
    if not train_examples:
        raise ValueError("no training examples")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    elif "default" not in adapter_configs(model):
        add_adapter(model, lora, "default")
    else:
        set_active(model, "default")
        mark_trainable(model, "default")
    params = _trainable(model)
    trainable, total = count_params(model)
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            fused=device.type == "cuda")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    mb = MicroBatches(train_examples, cfg.batch_size, cfg.seed, pad_id)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * mb.per_epoch / cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total_steps)
    config_echo = {"lora": None if cfg.full else lora.to_dict(), "train": asdict(cfg), "total_steps": total_steps,
                   "n_train": len(train_examples)}
    metrics_path = out_dir / "metrics.jsonl"
    result = TrainResult(out_dir, 0, trainable=trainable, total=total)
    start_step, done_tokens, done_secs = 0, 0, 0.0
    history: list[dict] = []
    if resume and (out_dir / CKPT / "state.json").exists():
        state = _load_checkpoint(out_dir, params, opt)
        if state["config"] != json.loads(json.dumps(config_echo)):
            raise ValueError(f"cannot resume {str(out_dir)!r}: its checkpoint was made with another configuration "
                             f"({state['config']}); pass the same options or a new output directory")
        start_step, done_tokens, done_secs = state["step"], state["tokens"], state["seconds"]
        history = _read_metrics(metrics_path, start_step)
        result.losses = [r["loss"] for r in history if "loss" in r]
        result.evals = [r for r in history if "eval_loss" in r]
    elif resume and (out_dir / DONE).exists():
        raise ValueError(f"{str(out_dir)!r} holds a finished run; nothing to resume")
    elif resume and progress:
        print(f"no checkpoint in {str(out_dir)!r}; starting from step 0")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE).unlink(missing_ok=True)
    atomic_write_json(out_dir / "train_config.json", config_echo)
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    if progress:
        print(("full fine-tuning: " if cfg.full else "LoRA: ") + trainable_report(model))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    tokens = done_tokens
    with metrics_path.open("a") as mlog:
        for step in range(start_step, total_steps):
            lr = lr_at(step, total_steps, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [mb.get(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
            denom = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro))
            loss_sum = 0.0
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                loss, _ = causal_lm_loss(model, b, denom=denom)
                loss.backward()
                loss_sum += float(loss.detach())
                tokens += int(b["attention_mask"].sum())
            gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm) \
                if cfg.max_grad_norm > 0 else torch.tensor(0.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            secs = done_secs + time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": float(gnorm), "tokens": tokens,
                   "tokens_per_s": (tokens - done_tokens) / max(secs - done_secs, 1e-9), "seconds": secs}
            result.losses.append(loss_sum)
            if eval_examples and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
                ev = evaluate_loss(model, eval_examples, pad_id, cfg.batch_size)
                rec.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
                result.evals.append(rec)
            mlog.write(json.dumps(rec) + "\n")
            mlog.flush()
            if bar:
                bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                _save_checkpoint(out_dir, step + 1, {"tokens": tokens, "seconds": secs, "config": config_echo},
                                 params, opt)
            if on_step:
                on_step(step + 1, loss_sum)
        if bar:
            bar.close()
        result.steps = total_steps
        result.tokens = tokens - done_tokens
        result.seconds = time.perf_counter() - t0
        if eval_examples:
            ev = evaluate_loss(model, eval_examples, pad_id, cfg.batch_size)
            rec = {"step": total_steps, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]}
            result.evals.append(rec)
            mlog.write(json.dumps(rec) + "\n")
    model.eval()
    if save_final:
        meta = {**(metadata or {}), "steps": total_steps, "final_loss": result.losses[-1] if result.losses else None}
        if cfg.full:
            save_full_model(model, tok, out_dir)
        else:
            save_adapter(model, out_dir, "default", base_name=base_name, metadata=meta)
    atomic_write_json(out_dir / DONE, {"steps": total_steps, "final_loss": result.losses[-1],
                                        "evals": result.evals, "trainable": trainable, "total": total})
    shutil.rmtree(out_dir / CKPT, ignore_errors=True)
    return result


def save_full_model(model, tok, out_dir: Path) -> None:
    """A fully fine-tuned model as a Hugging Face directory (weights + tokenizer), files replaced atomically."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out_dir / f.name)
