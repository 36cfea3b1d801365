"""One run of a sweep, in its own process: `python -m lorakit.lab.sweep_run <run_dir>/spec.json`.

kind "base":  the untouched model's held-out loss, accuracy and answers, and its loss on the general text.
kind "lora":  train an adapter (r, targets), then measure it; the base is the same model with adapters disabled.
kind "full":  full fine-tuning; afterwards a second copy of the base is loaded for KL and the per-layer SVD of
              the weight change (analysis.json); no full model is written to disk.
Peak memory: the base weights' bytes (made resident first) plus the rise of this process's VmHWM (peak
resident set, reset just before training) over its RSS at the start of training: the base weights plus all
that training adds, without the framework, tokenizer and data (the quantity `lorakit estimate` predicts).
The run's last act is writing result.json atomically: a run is done when that file exists.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from lorakit.lab.estimate import status_mib, reset_peak_rss, resident_weights
from lorakit.files import atomic_write_json

RESULT = "result.json"

log = logging.getLogger("lorakit.lab")


def _rows(path: str | None, n: int, skip: int = 0) -> list[dict]:
    from lorakit.train.data import load_rows

    if not path:
        return []
    rows = load_rows(path)[0][skip:]
    return rows[:n] if n else rows


def _held_out(model, tok, spec: dict, rows: list[dict], ex, pad: int, compare: bool = False,
              base_model=None) -> dict:
    """Held-out loss, greedy answers and accuracy; with `compare`, KL to the base from the same pass."""
    from lorakit.train.evaluate import accuracy, greedy_answers, loss_and_kl

    scores = loss_and_kl(model, ex, pad, spec["batch_size"], compare, base_model)
    out = {"eval_loss": scores["loss"]}
    if compare:
        out["kl"] = scores["kl"]
    answers = greedy_answers(model, tok, rows, spec["template"], spec["max_new_tokens"], 16)
    from lorakit.train.data import prompt_and_answer

    out["accuracy"] = accuracy(answers, [prompt_and_answer(r)[1] for r in rows])
    out["answers"] = answers
    return out


def _general_loss(model, tok, spec: dict, pad: int) -> float | None:
    from lorakit.train.data import build_examples
    from lorakit.train.evaluate import evaluate_loss

    rows = _rows(spec.get("general"), spec.get("general_rows", 0))
    if not rows:
        return None
    return evaluate_loss(model, build_examples(tok, rows, "plain", spec["max_len"]), pad, spec["batch_size"])["loss"]


def file_bytes(model, trainable_only: bool) -> int:
    """Bytes of the tensors a checkpoint would hold (tied tensors once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def _predicted_mib(model, spec: dict, lora, seq: int) -> float:
    from lorakit.lab.estimate import arch_of, estimate

    arch = arch_of(model.config)
    method = "full" if spec["kind"] == "full" else "lora"
    return estimate(arch, method, lora.r, spec["batch_size"], min(seq, spec["max_len"]), lora.targets,
                    spec["dtype"]).total / 2 ** 20


def run(spec: dict) -> dict:
    from lorakit.config import LoraConfig, TrainConfig
    from lorakit.templates import template_info
    from lorakit.train.data import build_examples
    from lorakit.train.evaluate import normalize
    from lorakit.models import base_reference, load_base
    from lorakit.train.loop import train

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    run_dir = Path(spec["run_dir"])
    t_start = time.perf_counter()
    model, tok = load_base(spec["model"], dtype=spec["dtype"], device="cpu")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eval_rows = _rows(spec["eval_data"], spec["eval_rows"])
    eval_ex = build_examples(tok, eval_rows, spec["template"], spec["max_len"])
    res: dict = {"name": spec["name"], "kind": spec["kind"], "r": spec.get("r"), "targets": spec.get("targets"),
                 "n_eval": len(eval_rows)}
    if spec["kind"] == "base":
        res.update(_held_out(model, tok, spec, eval_rows, eval_ex, pad))
        res["general_loss"] = _general_loss(model, tok, spec, pad)
        res["wall_seconds"] = time.perf_counter() - t_start
        return res

    train_rows = _rows(spec["data"], spec["train_rows"])
    train_ex = build_examples(tok, train_rows, spec["template"], spec["max_len"])
    full = spec["kind"] == "full"
    lora = LoraConfig(r=spec.get("r") or 8, alpha=spec.get("alpha") or 16.0,
                      targets=spec.get("targets") or "all-linear")
    cfg = TrainConfig(lr=spec["lr"], max_steps=spec["steps"], batch_size=spec["batch_size"], seed=spec["seed"],
                      warmup_ratio=spec["warmup_ratio"], max_len=spec["max_len"], full=full)
    weights_mib = resident_weights(model) / 2 ** 20
    can_reset = reset_peak_rss()
    start_mib = status_mib("VmRSS")
    tr = train(model, tok, train_ex, run_dir / "train", lora, cfg, progress=False, save_final=not full,
               base_name=base_reference(spec["model"]), metadata=template_info(tok, spec["template"]))
    peak = status_mib("VmHWM")
    res.update(trainable=tr.trainable, total_params=tr.total, steps=tr.steps, losses=tr.losses,
               train_loss=tr.losses[-1], train_loss_last5=sum(tr.losses[-5:]) / len(tr.losses[-5:]),
               train_seconds=tr.seconds, tokens=tr.tokens, tokens_per_s=tr.tokens_per_s,
               weights_mib=weights_mib, start_mib=start_mib, peak_rss_mib=peak,
               peak_mib=weights_mib + peak - start_mib if can_reset else None)
    res["seq_max"] = max(len(e.input_ids) for e in train_ex)
    res["predicted_peak_mib"] = _predicted_mib(model, spec, lora, res["seq_max"])
    if full:
        res["file_bytes"] = file_bytes(model, trainable_only=False)  # fp32 weights; not written
        base_model = load_base(spec["model"], dtype=spec["dtype"], device="cpu")[0]
    else:
        res["file_bytes"] = (run_dir / "train" / "adapter_model.safetensors").stat().st_size
        base_model = None
    res.update(_held_out(model, tok, spec, eval_rows, eval_ex, pad, compare=True, base_model=base_model))
    base_answers = json.loads((Path(spec["base_result"])).read_text())["answers"]
    res["answers_changed"] = sum(normalize(a) != normalize(b) for a, b in zip(res["answers"], base_answers)) \
        / max(len(base_answers), 1)
    res["general_loss"] = _general_loss(model, tok, spec, pad)
    if full:
        from lorakit.lab.analysis import analyze

        atomic_write_json(run_dir / "analysis.json", analyze(model, base_model, spec["svd_ranks"]))
    res["wall_seconds"] = time.perf_counter() - t_start
    return res


def main(argv: list[str]) -> int:
    """The entry of one sweep run's subprocess; its log lines go to stderr (the sweep keeps them in run.log)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if len(argv) != 1:
        log.error("usage: python -m lorakit.lab.sweep_run <run_dir>/spec.json")
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(spec)
    atomic_write_json(Path(spec["run_dir"]) / RESULT, res)
    log.info("%s: done in %.0f s", spec["name"], res["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
