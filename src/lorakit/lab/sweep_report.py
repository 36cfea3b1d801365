"""A sweep's outputs from its runs' result.json files: results.csv, report.md, PNG plots."""
from __future__ import annotations

import logging

import csv
import io
import json
import platform
from dataclasses import asdict, fields
from pathlib import Path

from lorakit.files import atomic_write_text
from lorakit.train.evaluate import wilson

PLOTS = ["quality_vs_rank.png", "cost_vs_rank.png", "loss_curves.png", "svd_energy.png"]
COLUMNS = ["name", "method", "targets", "r", "trainable_params", "trainable_pct", "file_mib", "peak_mib",
           "predicted_peak_mib", "train_seconds", "tokens_per_s", "train_loss", "eval_loss", "accuracy",
           "answers_changed", "kl", "general_loss", "forgetting", "full_ft_energy_at_r"]


def load_results(out: Path, runs: list[dict]) -> list[dict | None]:
    from lorakit.lab.sweep_run import RESULT

    res = []
    for r in runs:
        p = Path(out) / "runs" / r["name"] / RESULT
        res.append(json.loads(p.read_text()) if p.exists() else None)
    return res


def load_analysis(out: Path) -> dict | None:
    p = Path(out) / "runs" / "full" / "analysis.json"
    return json.loads(p.read_text()) if p.exists() else None


def rows(results: list[dict | None], analysis: dict | None) -> list[dict]:
    done = [r for r in results if r]
    base = next((r for r in done if r["kind"] == "base"), None)
    energy = dict(zip(analysis["ranks"], analysis["overall"])) if analysis else {}
    out = []
    for r in done:
        total = r.get("total_params")
        targets = r.get("targets")
        row = {"name": r["name"], "method": r["kind"], "r": r.get("r") if r["kind"] == "lora" else None,
               "targets": ("+".join(targets) if isinstance(targets, list) else targets) if r["kind"] == "lora"
               else None,
               "trainable_params": r.get("trainable"),
               "trainable_pct": 100 * r["trainable"] / total if total and r.get("trainable") else None,
               "file_mib": r["file_bytes"] / 2 ** 20 if r.get("file_bytes") else None,
               "peak_mib": r.get("peak_mib"), "predicted_peak_mib": r.get("predicted_peak_mib"),
               "train_seconds": r.get("train_seconds"), "tokens_per_s": r.get("tokens_per_s"),
               "train_loss": r.get("train_loss_last5"), "eval_loss": r.get("eval_loss"),
               "accuracy": r.get("accuracy"), "n_eval": r.get("n_eval"), "answers_changed": r.get("answers_changed"), "kl": r.get("kl"),
               "general_loss": r.get("general_loss"),
               "forgetting": (r["general_loss"] - base["general_loss"]) if base and r.get("general_loss") is not None
               and base.get("general_loss") is not None and r["kind"] != "base" else None,
               "full_ft_energy_at_r": energy.get(r.get("r")) if r["kind"] == "lora" else None}
        if row["accuracy"] is not None and row["n_eval"]:
            row["accuracy_lo"], row["accuracy_hi"] = wilson(round(row["accuracy"] * row["n_eval"]), row["n_eval"])
        out.append(row)
    return out


def _ci(t: dict) -> str:
    """'96% (86-99)': accuracy and its 95% Wilson interval."""
    if t.get("accuracy_lo") is None:
        return _pct(t.get("accuracy"))
    return f"{_pct(t['accuracy'])} ({100 * t['accuracy_lo']:.0f}-{100 * t['accuracy_hi']:.0f})"


def within_noise(a: dict, b: dict) -> bool:
    """Two runs' accuracies are not told apart when their 95% Wilson intervals overlap (a conservative test:
    with 50 rows, 96% and 88% overlap; 96% and 72% do not)."""
    if a.get("accuracy_lo") is None or b.get("accuracy_lo") is None:
        return a.get("accuracy") == b.get("accuracy")
    return a["accuracy_lo"] <= b["accuracy_hi"] and b["accuracy_lo"] <= a["accuracy_hi"]


def _fmt(v, key: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if key in ("accuracy", "answers_changed", "full_ft_energy_at_r"):
            return f"{v:.3f}"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: "" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                    for k in COLUMNS})
    return buf.getvalue()


def command_line(o, out: Path | str = "OUT") -> str:
    """The `lorakit sweep` command that makes a sweep with options `o` into `out`."""
    parts = ["lorakit sweep"]
    for f in fields(o):
        v = getattr(o, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "full":
            parts.append("--full" if v else "--no-full")
        elif f.name == "full_lr" and not o.full or f.name in ("lr", "alpha_ratio") and not o.targets:
            continue  # options of a method that was not run
        elif v in (None, ""):
            continue
        elif isinstance(v, list):
            parts.append(f"{flag} {','.join(map(str, v))}")
        else:
            parts.append(f"{flag} {v}")
    return " \\\n    ".join(parts) + f" \\\n    -o {out}"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _int(v) -> str:
    return "" if v is None else f"{v:.0f}"


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def results_table(table: list[dict]) -> str:
    header = ["run", "trainable", "file MiB", "peak MiB (pred.)", "train s", "tok/s", "train loss",
              "held-out loss", "accuracy (95% CI)", "changed", "KL", "general loss (Δ)"]
    body = []
    for t in table:
        train = t["trainable_params"]
        body.append([
            t["name"],
            "" if train is None else f"{train:,} ({t['trainable_pct']:.3g}%)",
            _fmt(t["file_mib"]),
            "" if t["peak_mib"] is None else f"{t['peak_mib']:.0f} ({_int(t['predicted_peak_mib'])})",
            _int(t["train_seconds"]), _int(t["tokens_per_s"]),
            _fmt(t["train_loss"]), _fmt(t["eval_loss"]), _ci(t), _pct(t["answers_changed"]),
            _fmt(t["kl"]),
            _fmt(t["general_loss"]) + ("" if t["forgetting"] is None else f" ({t['forgetting']:+.3f})")])
    return _md_table(header, body)


def svd_table(analysis: dict, table: list[dict]) -> str:
    ranks = analysis["ranks"]
    kinds = analysis["kinds"]
    attn = [k for k in kinds if k in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [k for k in kinds if k in ("gate_proj", "up_proj", "down_proj")]
    lora = {(t["targets"], t["r"]): t for t in table if t["method"] == "lora"}
    tsets = sorted({t for t, _ in lora})
    header = ["r", "energy, all modules", "attention", "MLP",
              f"random {'x'.join(map(str, next(iter(kinds.values()))['shape']))} matrix"] + \
        [f"LoRA {t} accuracy / held-out loss" for t in tsets]
    some = next(iter(kinds.values()))
    body = []
    for i, r in enumerate(ranks):
        mean = lambda ks: sum(kinds[k]["energy"][i] for k in ks) / len(ks) if ks else None  # noqa: E731
        row = [str(r), _pct(analysis["overall"][i]), _pct(mean(attn)), _pct(mean(mlp)), _pct(some["random_energy"][i])]
        for t in tsets:
            x = lora.get((t, r))
            row.append(f"{_pct(x['accuracy'])} / {x['eval_loss']:.4f}" if x else "")
        body.append(row)
    per_kind = _md_table(["module", "shape", "mean r for 90% energy", "mean ‖dW‖/‖W‖"],
                         [[k, "x".join(map(str, v["shape"])), f"{v['r90']:.1f}", f"{v['rel_change']:.2e}"]
                          for k, v in kinds.items()])
    return _md_table(header, body) + "\n\n" + per_kind


def headline(table: list[dict]) -> list[str]:
    """A few sentences computed from the table. A run is called best only when its accuracy is above every
    other LoRA run's beyond noise (95% Wilson intervals apart); otherwise the runs within noise are named."""
    full = next((t for t in table if t["method"] == "full"), None)
    base = next((t for t in table if t["method"] == "base"), None)
    lora = [t for t in table if t["method"] == "lora" and t["accuracy"] is not None]
    out = []
    top = max(lora, key=lambda t: (t["accuracy"], -t["eval_loss"])) if lora else None
    if top and len(lora) == 1:
        out.append(f"- One LoRA run so far: **{top['name']}**, accuracy {_ci(top)}, held-out loss "
                   f"{top['eval_loss']:.4f}, {top['trainable_params']:,} trainable parameters; no other LoRA run to "
                   f"compare it with yet.")
    elif top:
        tied = [t for t in lora if t is not top and within_noise(t, top)]
        n = top.get("n_eval")
        if not tied:
            out.append(f"- Best LoRA run: **{top['name']}**, accuracy {_ci(top)}, held-out loss "
                       f"{top['eval_loss']:.4f}, {top['trainable_params']:,} trainable parameters; above every "
                       f"other LoRA run beyond noise (95% intervals apart).")
        else:
            out.append(f"- No single best LoRA run: the top accuracy is {_ci(top)} (**{top['name']}**), and "
                       f"{len(tied)} other run(s) are within noise of it on {n or '?'} held-out rows (95% intervals "
                       f"overlap): " + ", ".join(f"{t['name']} {_pct(t['accuracy'])}" for t in tied) + ".")
    if full:
        line = (f"- Full fine-tuning: accuracy {_ci(full)}, held-out loss {full['eval_loss']:.4f}, "
                f"{full['trainable_params']:,} trainable parameters")
        if top:
            rel = "within noise of" if within_noise(full, top) else \
                ("above" if full["accuracy"] > top["accuracy"] else "below") + " (beyond noise)"
            line += (f" ({full['trainable_params'] / top['trainable_params']:.0f}x {top['name']}'s); its accuracy is "
                     f"{rel} the top LoRA run's"
                     + (f"; peak memory {full['peak_mib']:.0f} MiB vs {top['peak_mib']:.0f} MiB"
                        if full["peak_mib"] and top["peak_mib"] else ""))
        out.append(line + ".")
    if base:
        out.append(f"- Base model: accuracy {_ci(base)}, held-out loss {base['eval_loss']:.4f}.")
    for tset in sorted({t["targets"] for t in lora}):
        rs = sorted((t for t in lora if t["targets"] == tset), key=lambda t: t["r"])
        if len(rs) == 1:
            out.append(f"- LoRA on {tset}: one rank done so far (r={rs[0]['r']}), accuracy {_pct(rs[0]['accuracy'])}.")
            continue
        best = max(rs, key=lambda t: t["accuracy"])
        first = next(t for t in rs if within_noise(t, best))
        out.append(f"- LoRA on {tset}: accuracy from {_pct(rs[0]['accuracy'])} (r={rs[0]['r']}) to "
                   f"{_pct(rs[-1]['accuracy'])} (r={rs[-1]['r']}); top {_pct(best['accuracy'])} (r={best['r']}); "
                   f"the smallest rank within noise of it: r={first['r']}.")
    return out


def title(o, table: list[dict]) -> str:
    """The report's title, from what was run (no full fine-tuning words without a full fine-tuning run)."""
    has_full = any(t["method"] == "full" for t in table) or (o.full and not table)
    parts = []
    if o.targets:
        parts.append("rank" if len(o.ranks) > 1 else f"rank {o.ranks[0]}")
        if len(o.targets) > 1:
            parts.append("target set")
    if o.full and has_full:
        parts.append("full fine-tuning")
    what = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)
    return f"# {'LoRA sweep' if o.targets else 'Fine-tuning run'}: {what}"


def report_md(o, table: list[dict], analysis: dict | None, n_runs: int, plots: list[str],
              out: Path | str = "OUT") -> str:
    base = next((t for t in table if t["method"] == "base"), None)
    lrs = ([f"LoRA lr {o.lr}, alpha = {o.alpha_ratio:g}·r"] if o.targets else []) + \
        ([f"full fine-tuning lr {o.full_lr}"] if o.full else [])
    n_eval = next((t["n_eval"] for t in table if t.get("n_eval")), None)
    lines = [title(o, table), "",
             f"{len(table)} of {n_runs} runs done. Model `{o.model}` ({o.dtype}), training data `{o.data}`, "
             f"{o.steps} steps at batch {o.batch_size} for every run ({'; '.join(lrs)}), warmup "
             f"{o.warmup_ratio:g}, seed {o.seed}. Held-out: {n_eval or o.eval_rows or 'all'} rows of "
             f"`{o.eval_data}` (greedy, {o.max_new_tokens} new tokens, exact match). "
             f"General text for forgetting: `{o.general or 'none'}`.", "",
             f"Accuracy is measured on {n_eval or 'the'} held-out rows"
             + (f", so one answer is {100 / n_eval:.2g} points" if n_eval else "")
             + ": in brackets its 95% Wilson interval. Runs whose intervals overlap are not told apart here.", "",
             f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
             f"{o.threads or 'default'} thread(s) per run.", "", "Command:", "", "```", command_line(o, out), "```", ""]
    if base:
        lines += [f"Base model: accuracy {_pct(base['accuracy'])}, held-out loss {_fmt(base['eval_loss'])}, "
                  f"general-text loss {_fmt(base['general_loss'])}.", ""]
    lines += ["## Headline", ""] + headline(table) + [""]
    lines += ["## Results", "", results_table([t for t in table if t["method"] != "base"]), "",
              "Columns: *trainable* parameters (share of the model); *file*: the adapter file"
              + (" (full fine-tuning: the model's fp32 weights)" if any(t["method"] == "full" for t in table) else "")
              + "; *peak*: the base weights' bytes plus the rise of the run's peak "
              "resident memory (VmHWM, reset just before training) over its memory at the start of training; "
              "the framework, tokenizer and data are not in it; in brackets `lorakit estimate`'s prediction "
              "for the run's longest example; *train s* and *tok/s*: training only; *train loss*: mean of the "
              "last 5 steps; "
              "*changed*: share of held-out answers that differ from the base model's; *KL*: mean "
              "KL(tuned ‖ base) per held-out target token, nats; *general loss (Δ)*: loss on the general text "
              "after training (its change from the base: forgetting).", ""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    if analysis:
        lines += ["## The low-rank hypothesis, measured", "",
                  "For each linear weight of the decoder layers, the full fine-tune's change dW = W_ft − W_base, "
                  "and the share of ‖dW‖² in its top r singular values (what the best rank-r matrix keeps, so an "
                  "upper bound on what LoRA at rank r could copy of the full fine-tune), averaged over layers; a "
                  "Gaussian random matrix of the same shape for reference; beside it, LoRA's result at r.", "",
                  svd_table(analysis, table), ""]
    return "\n".join(lines)


def predict_peaks(o, results: list[dict | None]) -> None:
    """Fill each training run's predicted_peak_mib from the current memory model (lorakit estimate) and the
    run's longest training example, so the report always sets measurement beside today's prediction."""
    from lorakit.lab.estimate import arch_of, estimate, load_config

    todo = [r for r in results if r and r["kind"] != "base" and r.get("seq_max")]
    if not todo:
        return
    arch = arch_of(load_config(o.model), o.model)
    for r in todo:
        method = "full" if r["kind"] == "full" else "lora"
        r["predicted_peak_mib"] = estimate(arch, method, r.get("r") or 8, o.batch_size, min(r["seq_max"], o.max_len),
                                           r.get("targets") or "all-linear", o.dtype).total / 2 ** 20


def write_outputs(out: Path, results: list[dict | None], o, plots: bool = True) -> None:
    out = Path(out)
    analysis = load_analysis(out)
    predict_peaks(o, results)
    table = rows(results, analysis)
    atomic_write_text(out / "results.csv", to_csv(table))
    pngs: list[str] = []
    if plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            logging.getLogger("lorakit.lab").warning("plots skipped: matplotlib is not installed "
                                                     "(pip install 'lorakit[plot]')")
        else:
            from lorakit.lab.plots import write_all

            pngs = [str(p) for p in write_all(out, results, analysis)]
    else:
        pngs = [str(out / n) for n in PLOTS if (out / n).exists()]
    atomic_write_text(out / "report.md", report_md(o, table, analysis, len(results), pngs, out))
    atomic_write_text(out / "results.json", json.dumps({"options": asdict(o), "runs": table}, indent=2) + "\n")
