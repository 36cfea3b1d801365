"""Evaluation: loss/perplexity, exact-match accuracy (greedy), and the behaviour change against the base:
the share of answers that changed and the KL divergence from the base's next-token distributions."""
from __future__ import annotations

import contextlib
import math
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.templates import render_prompt, resolve_template
from lorakit.train.data import Example, build_examples, collate, prompt_and_answer, row_format
from lorakit.generate import generate_ids
from lorakit.core.inject import active_adapters, disabled
from lorakit.train.backends import causal_lm_loss, target_logits


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


def normalize(text: str) -> str:
    """Answers compare after trimming whitespace and collapsing inner runs of it."""
    return " ".join(text.split())


def greedy_answers(model, tok, rows: list[dict], template: str = "auto", max_new_tokens: int = 32,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[str]:
    template = resolve_template(tok, template)
    prompts = [tok(render_prompt(tok, prompt_and_answer(r)[0], template), add_special_tokens=False)["input_ids"]
               for r in rows]
    outs = generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        on_batch=on_batch)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95% at z=1.96): how far an accuracy measured on n
    rows can be trusted. Unlike the normal approximation it stays inside [0, 1] and is sound at 0% and 100%."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def accuracy(preds: list[str], refs: list[str]) -> float:
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / max(len(refs), 1)


@torch.no_grad()
def loss_and_kl(model, examples, pad_id: int, batch_size: int = 8, compare: bool = True,
                base_model=None, on_batch: Callable[[int], None] | None = None) -> dict:
    """One pass over the examples: the model's mean loss per target token and, with `compare`, the base's
    loss and the mean KL(p_model || p_base) per target token, from the same batches (two forwards a batch).
    The base is `base_model`, or `model` with its adapters disabled."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    loss = base_loss = kl = 0.0
    count = 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        logits, targets = target_logits(model, b)
        logp = F.log_softmax(logits.float(), -1)  # (n, vocab)
        loss += float(F.nll_loss(logp, targets, reduction="sum"))
        if compare:
            with (disabled(model) if base_model is None else contextlib.nullcontext()):
                logq = F.log_softmax(target_logits(base_model or model, b)[0].float(), -1)
            base_loss += float(F.nll_loss(logq, targets, reduction="sum"))
            kl += float((logp.exp() * (logp - logq)).sum())
        count += targets.numel()
        if on_batch is not None:
            on_batch(len(examples[i:i + batch_size]))
    model.train(was)
    n = max(count, 1)
    out = {"loss": loss / n, "tokens": count}
    if compare:
        out.update(base_loss=base_loss / n, kl=kl / n)
    return out


@dataclass
class Report:
    n: int
    before: dict = field(default_factory=dict)  # loss, ppl, accuracy
    after: dict = field(default_factory=dict)
    changed: float | None = None  # share of answers that differ from the base's
    kl: float | None = None
    examples: list[dict] = field(default_factory=list)  # prompt, reference, before, after

    def to_dict(self) -> dict:
        return {"n": self.n, "before": self.before, "after": self.after, "answers_changed": self.changed,
                "kl_to_base": self.kl, "examples": self.examples}


def evaluate(model, tok, rows: list[dict], template: str = "auto", max_new_tokens: int = 32,
             batch_size: int = 16, base_model=None, compare: bool = True, max_len: int = 512,
             progress: bool = False) -> Report:
    """Loss, perplexity and (for completion-style rows) greedy exact-match, for the model as it is and,
    with `compare`, for the base (adapters disabled, or `base_model`), plus the behaviour change.
    `progress`: a tqdm bar (stderr) per pass: the loss pass, then the answers of each model."""
    if not rows:
        raise ValueError("no evaluation rows")
    template = resolve_template(tok, template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples = build_examples(tok, rows, template, max_len)
    completion_style = row_format(rows[0]) != "text"
    rep = Report(n=len(rows))
    if compare and base_model is None and not active_adapters(model):
        raise ValueError("nothing to compare: the model has no active adapter (pass base_model or compare=False)")

    with _bar(progress, len(rows), "eval loss" + (" + KL" if compare else "")) as up:
        scores = loss_and_kl(model, examples, pad, batch_size, compare, base_model, on_batch=up)

    def answers(m, ctx, who: str) -> list[str]:
        if not completion_style:
            return []
        with ctx, _bar(progress, len(rows), f"answers ({who})") as up:
            return greedy_answers(m, tok, rows, template, max_new_tokens, batch_size, on_batch=up)

    def metrics(loss: float, preds: list[str]) -> dict:
        res = {"loss": loss, "ppl": perplexity(loss)}
        if completion_style:
            res["accuracy"] = accuracy(preds, [prompt_and_answer(r)[1] for r in rows])
        return res

    after = answers(model, contextlib.nullcontext(), "adapter" if compare else "model")
    rep.after = metrics(scores["loss"], after)
    if compare:
        base, ctx = (model, disabled(model)) if base_model is None else (base_model, contextlib.nullcontext())
        before = answers(base, ctx, "base")
        rep.before = metrics(scores["base_loss"], before)
        rep.kl = scores["kl"]
        if completion_style:
            rep.changed = sum(normalize(a) != normalize(b) for a, b in zip(after, before)) / len(rows)
    else:
        before = [None] * len(after)
    if completion_style:
        for r, a, b in zip(rows, after, before):
            p, ref = prompt_and_answer(r)
            rep.examples.append({"prompt": p if isinstance(p, str) else p[-1]["content"], "reference": ref,
                                 "before": b, "after": a})
    return rep


@contextlib.contextmanager
def _bar(on: bool, total: int, desc: str):
    """A tqdm bar over `total` rows, yielding its update function (a no-op when `on` is false)."""
    if not on:
        yield None
        return
    from tqdm import tqdm

    import sys

    with tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        yield bar.update


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_report(rep: Report, n_examples: int = 5, width: int = 38) -> str:
    lines = [f"evaluated on {rep.n} rows", "", f"{'metric':<12}{'base':>12}{'adapter':>12}"]
    keys = [k for k in ("loss", "ppl", "accuracy") if k in rep.after]
    for k in keys:
        lines.append(f"{k:<12}{_fmt(rep.before.get(k)):>12}{_fmt(rep.after.get(k)):>12}")
    if "accuracy" in rep.after:
        ci = {k: wilson(round(d["accuracy"] * rep.n), rep.n) for k, d in (("base", rep.before), ("adapter", rep.after))
              if "accuracy" in d}
        lines.append(f"accuracy, 95% interval on {rep.n} rows (Wilson): "
                     + ", ".join(f"{k} {100 * lo:.0f}-{100 * hi:.0f}%" for k, (lo, hi) in ci.items()))
    if rep.changed is not None:
        lines.append(f"answers changed vs base: {100 * rep.changed:.1f}%")
    if rep.kl is not None:
        lines.append(f"KL(adapter || base) per target token: {rep.kl:.4f} nats")

    def cut(s):
        s = "-" if s is None else s.replace("\n", " ")
        return s if len(s) <= width else s[:width - 1] + "…"

    if rep.examples and n_examples:
        shown = [((e["prompt"].strip().splitlines() or [""])[-1],  # the row's own part, not a shared instruction
                  e["reference"], e["before"], e["after"]) for e in rep.examples[:n_examples]]
        # the reference is what the answers are judged by: never cut, wrapped in its column past `width`
        refs = [textwrap.wrap(" ".join(str(r).split()), width, break_long_words=True) or ["-"] for _, r, _, _ in shown]
        cells = [(cut(p), ref[0], cut(b), cut(a)) for (p, _, b, a), ref in zip(shown, refs)]
        heads = ("prompt", "reference", "base", "adapter")
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]  # each at most `width`
        widths[1] = max(widths[1], *(len(part) for ref in refs for part in ref))
        fmt = lambda vals: " | ".join(f"{v:<{w}}" for v, w in zip(vals, widths)).rstrip()  # noqa: E731
        lines += ["", fmt(heads)]
        for row, ref in zip(cells, refs):
            lines += [fmt(row)] + [fmt(("", part)) for part in ref[1:]]
    return "\n".join(lines)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
