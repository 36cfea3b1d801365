"""The README's "Results" table, generated from the committed result files, so prose never drifts from them.

    python scripts/results_table.py           # rewrite README.md between <!-- results:begin --> and <!-- results:end -->
    python scripts/results_table.py --check   # exit 1 (and show the difference) if a file disagrees

Every number in the table is read from a file under bench/results/ or docs/ (named in the row's source column);
the row texts around the numbers are fixed here. The same for the `lorakit estimate` examples in
docs/experiments.md (between <!-- estimate:begin --> and <!-- estimate:end -->), computed by lorakit.lab.estimate.
tests/unit/test_results_table.py compares both with what is committed.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorakit.train.evaluate import wilson  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DEMO = "bench/results/demo_output_cpu-2core_2026-11-29_r2.txt"
SPEED = "bench/results/train_speed_cpu-2core_2026-12-05_r3.jsonl"
TASK = "bench/results/train_task_cpu-2core_2026-12-05_r2.jsonl"
DEFAULTS = "bench/results/defaults_cpu-2core_2026-11-29.jsonl"
GPU_R5 = "bench/results/gpu_train_h200_2026-11-29_r5.jsonl"
GPU_R1 = "bench/results/gpu_train_h200_2026-11-29_r1.jsonl"
GPU_R2 = "bench/results/gpu_train_h200_2026-11-29_r2.jsonl"
GPU_R3 = "bench/results/gpu_train_h200_2026-11-29_r3.jsonl"
DIST = "bench/results/gpu_dist_h200x2_2026-11-29.jsonl"
DIFFUSION = "bench/results/diffusion_cpu-2core_2026-11-29.json"
SERVE = "bench/results/serve_load_cpu-quiet_2026-11-23.jsonl"
QUANT = "bench/results/quant_memory-cpu-2core.jsonl"
MIX = "bench/results/mixture-cpu.json"
MIX_RUN1 = "bench/results/mixture-cpu-run1-unnormalized-router.json"
MIX_CLI = "bench/results/mixture-cli_cpu-2core_2026-11-29.json"
MIX_SERVE = "bench/results/mixture_serve_cpu-2core_2026-11-29.json"
REPLICAS = "bench/results/serve_replicas_load_cpu-2core_2026-12-05.json"
PG_REPEAT = "bench/results/pg_race_kill_10x_cpu-2core_2026-12-05.txt"
SWEEP_CSV = "docs/sweep/results.csv"
SWEEP_JSON = "docs/sweep/results.json"


def _jsonl(root: Path, rel: str) -> list[dict]:
    return [json.loads(line) for line in (root / rel).read_text().splitlines() if line.strip()]


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _ci(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * lo:.0f}-{100 * hi:.0f}%"


def _link(*paths: str) -> str:
    return ", ".join(f"[{p}]({p})" for p in paths)


def _span(xs, fmt: str) -> str:
    lo, hi = format(min(xs), fmt), format(max(xs), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- one function per row: (what, result, source)
def demo(root: Path) -> tuple[str, str, str]:
    text = (root / DEMO).read_text()
    n = int(re.search(r"evaluated on (\d+) rows", text).group(1))
    metric = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^(loss|accuracy)\s+([\d.]+)\s+([\d.]+)$", text, re.M)}
    changed = float(re.search(r"answers changed vs base: ([\d.]+)%", text).group(1))
    kl = float(re.search(r"per target token: ([\d.]+) nats", text).group(1))
    mins, secs = re.search(r"^real\s+(\d+)m([\d.]+)s", text, re.M).groups()
    conditions = text.splitlines()[0].split("; ", 1)[1]  # the header: how the run was made
    (acc0, acc1), (loss0, loss1) = metric["accuracy"], metric["loss"]
    result = (f"exact match {_pct(acc0)} (base) -> {_pct(acc1)} (adapter; 95% interval {_ci(round(acc1 * n), n)}) "
              f"on {n} held-out rows; loss {loss0:.3f} -> {loss1:.3f}; {changed:.0f}% of answers changed, "
              f"KL {kl:.2f} nats; {int(mins)} min {float(secs):.0f} s for `./demo.sh` on a fresh clone of this "
              f"2-core machine, setup included ({conditions})")
    return "demo task (dates to ISO 8601), embedded SmolLM2-135M, CPU", result, _link(DEMO)


def cpu_speed(root: Path) -> tuple[str, str, str]:
    rows = _jsonl(root, SPEED)
    by = {c: [r for r in rows if r["case"] == c] for c in ("lorakit", "lorakit-noshare", "peft")}
    tps = {c: _mean(r["tokens_per_s"] for r in rs) for c, rs in by.items() if rs}
    rss = {c: _mean(r["peak_rss_mib"] for r in rs) / 1024 for c, rs in by.items() if rs}
    rounds = sorted({r["round"] for r in rows})
    ratios = [_mean(r["tokens_per_s"] for r in by["lorakit"] if r["round"] == k)
              / _mean(r["tokens_per_s"] for r in by["peft"] if r["round"] == k) for k in rounds]
    peft = re.search(r'"peft==([\d.]+)"', (root / "pyproject.toml").read_text()).group(1)
    r0 = rows[0]
    what = (f"CPU training speed vs PEFT {peft} (demo rows, r={r0['r']} {r0['targets']}, batch {r0['batch']}, "
            f"{r0['threads']} cores)")
    result = (f"the training loop {tps['lorakit']:.1f} tokens/s vs PEFT {tps['peft']:.1f} "
              f"({tps['lorakit'] / tps['peft']:.2f}x, {len(rounds)} interleaved rounds: "
              f"{min(ratios):.2f}-{max(ratios):.2f}x a round), peak RSS {rss['lorakit']:.2f} vs "
              f"{rss['peft']:.2f} GiB ({100 * (rss['lorakit'] / rss['peft'] - 1):+.0f}%)")
    if "lorakit-noshare" in tps:
        result += (f"; without the shared-prefix forward {tps['lorakit-noshare']:.1f} tokens/s "
                   f"({tps['lorakit-noshare'] / tps['peft']:.2f}x)")
    return what, result, _link(SPEED)


def cpu_task(root: Path) -> tuple[str, str, str]:
    rows = {r["case"]: r for r in _jsonl(root, TASK)}
    lk, pf = rows["lorakit"], rows["peft"]

    def acc(r):
        n = r["heldout"]["n"]
        a = r["heldout"]["after"]["accuracy"]
        return f"{_pct(a)} ({_ci(round(a * n), n)})"
    result = (f"one epoch ({lk['steps']} steps): `lorakit train` {lk['tokens_per_s']:.0f} tokens/s vs PEFT "
              f"{pf['tokens_per_s']:.0f} ({lk['tokens_per_s'] / pf['tokens_per_s']:.2f}x; {lk['train_s'] / 60:.1f} vs "
              f"{pf['train_s'] / 60:.1f} min), peak RSS {lk['peak_rss_mib'] / 1024:.2f} vs "
              f"{pf['peak_rss_mib'] / 1024:.2f} GiB; held-out exact match {acc(lk)} vs {acc(pf)} "
              f"on {lk['heldout']['n']} rows")
    for case, label in (("lorakit-noshare", "without the shared prefix"), ("lorakit-nogroup", "unsorted batches")):
        if case in rows:
            result += f"; {label} {rows[case]['tokens_per_s'] / pf['tokens_per_s']:.2f}x"
    return (f"CPU, a classification task (data/classify: 10 classes, 1,200 chat rows; r={lk['r']} {lk['targets']}, "
            f"lr {lk['lr']:g}, batch {lk['batch']})"), result, _link(TASK)


def defaults(root: Path) -> tuple[str, str, str]:
    rows = _jsonl(root, DEFAULTS)
    names = {"lorakit": "the defaults (r=16, alpha=32, all linear, lr 2e-4)", "peft": "`--preset peft` (r=8, q,v)",
             "qv16": "r=16 q,v", "lr3e-4": "defaults at lr 3e-4", "lr5e-4": "at lr 5e-4"}
    parts = []
    for task in dict.fromkeys(r["task"] for r in rows):
        got = [f"{names.get(r['config'], r['config'])} {_pct(r['accuracy'])} "
               f"({_ci(round(r['accuracy'] * r['n_heldout']), r['n_heldout'])})" for r in rows if r["task"] == task]
        n = next(r["n_heldout"] for r in rows if r["task"] == task)
        parts.append(f"{task} ({n} held-out rows): " + ", ".join(got))
    return "which defaults: one epoch of `lorakit train` per setting, held-out exact match (95% interval)", \
        "; ".join(parts), _link(DEFAULTS)


def gpu_speed(root: Path) -> tuple[str, str, str]:
    def pick(rel, case, tool, **variant):
        return next(r for r in _jsonl(root, rel) if r.get("case") == case and r.get("tool") == tool
                    and "tokens_per_s" in r and (r.get("variant") or {}) == variant)
    cli1, liger1 = pick(GPU_R3, "1b", "cli"), pick(GPU_R3, "1b", "peft", bf16="1", liger="1")
    mod1, peft1 = pick(GPU_R3, "1b", "lorakit"), pick(GPU_R1, "1b", "peft")
    cli8, liger8 = pick(GPU_R2, "8b", "cli"), pick(GPU_R2, "8b", "peft", bf16="1", liger="1")
    cli8c, liger8c = pick(GPU_R2, "8b-ckpt", "cli", rec="all"), pick(GPU_R2, "8b-ckpt", "peft", bf16="1", liger="1")
    mlp5, liger5 = pick(GPU_R5, "1b", "cli", mlp="1"), pick(GPU_R5, "1b", "peft", bf16="1", liger="1")

    def x(a, b):
        return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
    result = (f"`lorakit train`, llama-1b shape: {cli1['tokens_per_s'] / 1e3:.1f}k tokens/s at {cli1['peak_gib']:.1f} GiB "
              f"({x(cli1, mod1)} of the fast module in the same run): {x(cli1, liger1)} PEFT bf16 + Liger "
              f"({liger1['peak_gib']:.1f} GiB), {x(cli1, peft1)} PEFT's defaults; at PEFT + Liger's memory "
              f"(`--fused-mlp`, another run): {x(mlp5, liger5)} at {mlp5['peak_gib']:.2f} vs {liger5['peak_gib']:.2f} GiB; "
              f"llama-8b: {x(cli8, liger8)} PEFT + Liger "
              f"at {cli8['peak_gib']:.1f} vs {liger8['peak_gib']:.1f} GiB; both recomputing every layer: "
              f"{x(cli8c, liger8c)} at {cli8c['peak_gib']:.1f} vs {liger8c['peak_gib']:.1f} GiB. Same step-1 loss "
              f"({cli1['loss_first']:.4f} vs {liger1['loss_first']:.4f})")
    return f"GPU training speed vs PEFT ({cli1['device'].split()[1]}, bf16, r=16 all-linear)", result, \
        _link(GPU_R1, GPU_R2, GPU_R3, GPU_R5) + "; [docs/gpu.md](docs/gpu.md)"


def distributed(root: Path) -> tuple[str, str, str]:
    s = next(r for r in _jsonl(root, DIST) if r.get("summary"))
    result = (f"llama-1b, DDP: {s['1b']['speedup']:.2f}x the tokens/s of one GPU at the same per-GPU batch; "
              f"llama-8b LoRA, FSDP2: {s['8b']['peak_ratio']:.2f}x the per-GPU peak memory; 8b full fine-tuning: "
              f"{s['8b-full']['peak_ratio']:.2f}x")
    return f"`lorakit train --nproc 2` on {s['gpus']} x {s['device'].split()[1]}", result, \
        _link(DIST) + "; [docs/distributed.md](docs/distributed.md)"


def diffusion(root: Path) -> tuple[str, str, str]:
    r = json.loads((root / DIFFUSION).read_text())
    s = r["samples"]
    result = (f"share of samples the classifier reads as a new digit (5-9): base {_pct(s['base']['new_share'])}, "
              f"adapter at weight 0.5 {_pct(s['lora_w0.5']['new_share'])}, at 1.0 {_pct(s['lora_w1']['new_share'])} "
              f"(256 samples each); whole demo {r['seconds_total']:.0f} s with {r['threads']} thread on a loaded machine")
    return "diffusion: LoRA teaches a digits DDPM (0-4) the digits 5-9, CPU", result, \
        _link(DIFFUSION) + "; [docs/diffusion.md](docs/diffusion.md)"


def serving(root: Path) -> tuple[str, str, str]:
    rows = _jsonl(root, SERVE)

    def case(c):
        return [r for r in rows if r["case"] == c]

    result = (f"quiet 2-core machine: base {_span([r['tokens_per_s'] for r in case('base')], '.0f')} tokens/s; "
              f"4 mixed adapters {_span([r['vs_base'] for r in case('mixed-4')], '.2f')}x, 16 adapters "
              f"{_span([r['vs_base'] for r in case('mixed-16')], '.2f')}x of base throughput "
              f"({len(case('base'))} rounds); one request at a time "
              f"{_span([r['vs_base'] for r in case('one-at-a-time-4')], '.2f')}x")
    return "serving, CPU: mixed adapters in one batch vs base-only traffic", result, \
        _link(SERVE) + "; [docs/serving.md](docs/serving.md)"


def qlora_memory(root: Path) -> tuple[str, str, str]:
    rows = {r["case"]: r for r in _jsonl(root, QUANT)}
    mem, rec = rows["memory"], rows["reconstruction"]
    result = (f"{mem['model_fp32_bytes'] / 1e6:.0f} MB fp32 -> {mem['model_nf4_bytes'] / 1e6:.0f} MB NF4 "
              f"({mem['bits_per_weight']:.2f} bits per linear weight)")
    if rec.get("bnb_code_agreement_min") == 1.0:
        result += "; codes bit-identical to bitsandbytes'"
    return "QLoRA base memory (embedded model)", result, _link(QUANT) + "; [docs/variants.md](docs/variants.md)"


def mixture(root: Path) -> tuple[str, str, str]:
    now = json.loads((root / MIX).read_text())
    run1 = json.loads((root / MIX_RUN1).read_text())["results"]  # the baselines' exact match (same adapters)
    n = 2 * now["args"]["n_test"]
    router = now["results"]["router"]["exact_mixed"]
    result = (f"router {_pct(router)} exact match (95% interval {_ci(round(router * n), n)}, {n} rows) vs "
              f"{_pct(run1['only_reverse']['exact_mixed'])} / {_pct(run1['only_upper']['exact_mixed'])} for each "
              f"single adapter, {_pct(run1['uniform_mix']['exact_mixed'])} for a uniform mix")
    return "mixture of LoRAs (two tasks, mixed held-out set)", result, \
        _link(MIX, MIX_RUN1) + "; [docs/mixture.md](docs/mixture.md)"


def mixture_cli(root: Path) -> tuple[str, str, str]:
    r = json.loads((root / MIX_CLI).read_text())["results"]
    s = json.loads((root / MIX_SERVE).read_text())["summary"]
    result = (f"`lorakit train` x2 + `lorakit train-router` + `lorakit eval`: mixture {_pct(r['router']['exact_mixed'])} "
              f"exact match vs {_pct(r['reverse']['exact_mixed'])} / {_pct(r['upper']['exact_mixed'])} for each adapter, "
              f"{_pct(r['uniform']['exact_mixed'])} uniform; served per token at "
              f"{s['mixture']['tokens_per_s_vs_single']:.2f}x a single adapter's decode tokens/s (CPU, same run)")
    return "mixture of LoRAs end to end through the CLI and the server", result, \
        _link(MIX_CLI, MIX_SERVE) + "; [docs/mixture.md](docs/mixture.md)"


def sweep(root: Path) -> tuple[str, str, str]:
    rows = list(csv.DictReader((root / SWEEP_CSV).open()))
    n = next(r["n_eval"] for r in json.loads((root / SWEEP_JSON).read_text())["runs"] if r.get("n_eval"))
    num = [{k: (float(v) if k not in ("name", "method", "targets") and v != "" else v) for k, v in r.items()}
           for r in rows]
    full = next(r for r in num if r["method"] == "full")
    lora = [r for r in num if r["method"] == "lora"]
    label = {"all-linear": "all-linear", "attn": "attention-only"}
    tops = []
    for t in ("all-linear", "attn"):
        rs = sorted((r for r in lora if r["targets"] == t), key=lambda r: (-r["accuracy"], r["r"]))
        tops.append((t, rs[0], next(r for r in lora if r["targets"] == t and r["r"] == 1)))
    best = max(lora, key=lambda r: r["accuracy"])
    k = lambda r: round(r["accuracy"] * n)  # noqa: E731
    lo_b, hi_b = wilson(k(best), n)
    lo_f, hi_f = wilson(k(full), n)
    overlap = lo_b <= hi_f and lo_f <= hi_b
    forget = [r["forgetting"] for r in lora]
    (t1, a1, a1r1), (t2, a2, a2r1) = tops
    result = (f"held-out exact match ({n} rows): full fine-tuning {_pct(full['accuracy'])} "
              f"({full['trainable_params'] / 1e6:.1f}M trainable params, peak {full['peak_mib']:.0f} MiB); LoRA "
              f"{label[t1]} r={a1['r']:.0f} {_pct(a1['accuracy'])} ({a1['trainable_params'] / 1e6:.1f}M, "
              f"{a1['peak_mib']:.0f} MiB), {label[t2]} r={a2['r']:.0f} {_pct(a2['accuracy'])} "
              f"({a2['trainable_params'] / 1e6:.1f}M); LoRA at r=1 already {_pct(a1r1['accuracy'])} ({label[t1]}) / "
              f"{_pct(a2r1['accuracy'])} ({label[t2]}). 95% intervals: {_pct(best['accuracy'])} is "
              f"{_ci(k(best), n)}, {_pct(full['accuracy'])} is {_ci(k(full), n)}: "
              + ("LoRA and full fine-tuning are within noise of each other at this size" if overlap
                 else "LoRA and full fine-tuning differ beyond noise")
              + f". Forgetting on general text {min(forget):+.4f} to {max(forget):+.4f} nats for LoRA, "
              f"{full['forgetting']:+.4f} for full FT")
    return "LoRA rank sweep vs full fine-tuning", result, _link(SWEEP_CSV) + "; [docs/sweep/report.md](docs/sweep/report.md)"


ROWS = [demo, cpu_speed, cpu_task, defaults, gpu_speed, distributed, serving, qlora_memory, mixture, mixture_cli, sweep, diffusion]


def table(root: Path = ROOT) -> str:
    lines = ["<!-- generated by scripts/results_table.py from the files in the source column: edit the script or "
             "the files, not this table -->", "| what | result | source |", "|---|---|---|"]
    lines += ["| " + " | ".join(row(root)) + " |" for row in ROWS]
    return "\n".join(lines)


def estimate_examples() -> str:
    """The docs/experiments.md paragraph of `lorakit estimate` examples, from the estimator itself."""
    from transformers import LlamaConfig

    from lorakit.lab.estimate import arch_of, estimate, load_config

    small = arch_of(load_config("embedded"), "embedded")
    big = arch_of(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False), "llama-3-8b")
    e = {m: estimate(small, m, 16, 8, 512, "all-linear", "float32") for m in ("lora", "qlora", "full")}
    b = {m: estimate(big, m, 16, 4, 1024, "all-linear", "bfloat16", checkpointing=True) for m in e}
    gib = lambda x: f"{x.total / 2 ** 30:.{2 if x.total < 10 * 2 ** 30 else 1}f} GiB"  # noqa: E731
    share = (e["lora"].activations + e["lora"].logits) / e["lora"].total
    return (f"Examples (predictions, not measurements; this paragraph is generated by `scripts/results_table.py`):\n"
            f"`lorakit estimate --model embedded --r 16 --batch 8 --seq 512` gives LoRA {gib(e['lora'])}, QLoRA "
            f"{gib(e['qlora'])}, full {gib(e['full'])} in fp32 ({share:.0%} of LoRA's peak is activations and "
            f"logits); for a Llama-3-8B-shaped config (hidden 4096, 32 layers, 8 KV heads, vocabulary 128,256) in "
            f"bf16 at batch 4 x 1024 with checkpointing: LoRA {gib(b['lora'])}, QLoRA {gib(b['qlora'])}, full "
            f"{gib(b['full'])} (bf16 weights, gradients and AdamW states).")


def _from_docs(path: str) -> str:
    return f"[{path}](../{path})"  # a link from a page under docs/


def pg_repeat(root: Path = ROOT) -> str:
    """docs/serving.md's sentence on the PostgreSQL race and kill tests run again and again (bench/repeat_tests.sh)."""
    text = (root / PG_REPEAT).read_text()
    runs = re.findall(r"^run \d+: rc=0 .*\(wall (\d+) s, loadavg 1m before ([\d.]+)\)$", text, re.M)
    n = int(re.search(r"^(\d+) of \1 runs passed in a row$", text, re.M).group(1))
    assert len(runs) == n, f"{PG_REPEAT}: {len(runs)} passing runs listed, {n} claimed"
    return (f"The race and kill tests passed {n} runs in a row (`bench/repeat_tests.sh`, each a fresh pytest and "
            f"cluster: {_span([int(w) for w, _ in runs], '.0f')} s a run on the shared 2-core machine, load average "
            f"{_span([float(a) for _, a in runs], '.1f')} before each), {_from_docs(PG_REPEAT)}.")


def replicas(root: Path = ROOT) -> str:
    """docs/serving.md's two-replica load result (bench/serve_replicas_load.py)."""
    r = json.loads((root / REPLICAS).read_text())
    a, b = r["per_replica"]
    ev = {p["registry_events"] for p in r["per_replica"]}
    changes = r["adds"] + r["rollbacks"] + r["versions_removed"]
    notified = f"{ev.pop()} of {changes}" if len(ev) == 1 else " / ".join(str(p["registry_events"]) for p in (a, b))
    cols = ["honest requests", "errors", "served by a removed version",
            "changes (adds / rollbacks / versions removed)", "notified per replica", "slots dropped (A / B)",
            "hostile (5xx)", "tokens/s", "latency p50 / p99"]
    row = [f"{r['honest_requests']} ({a['honest_requests']} on A, {b['honest_requests']} on B)",
           str(r["honest_errors"] + r["change_errors"]),
           f"{r['served_by_removed_version']} ({r['served_by_a_version_removed_later']} adapter uses by versions "
           "removed later, all sent before the removal)",
           f"{r['adds']} / {r['rollbacks']} / {r['versions_removed']}", notified,
           f"{a['slots_dropped']} / {b['slots_dropped']}", f"{r['hostile_requests']} ({r['hostile_5xx']})",
           f"{r['tokens_per_s']:.1f}", f"{r['latency_p50_s']:.1f} / {r['latency_p99_s']:.1f} s"]
    return (f"One run on the shared {r['cpu_count']}-core machine (both servers, PostgreSQL, the changer and the "
            f"clients on the same cores; load average {r['loadavg_1m_before']:.1f} before, "
            f"{r['loadavg_1m_after']:.1f} after), {_from_docs(REPLICAS)} (generated by `scripts/results_table.py`):\n\n"
            + "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n| " + " | ".join(row) + " |")


def between(text: str, begin: str, end: str, body: str, name: str) -> str:
    """`text` with `body` between the one `begin` ... `end` pair."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{name} must hold one {begin} ... {end} pair")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end)[1]}"


def render(readme: str, root: Path = ROOT) -> str:
    """README text with the generated table between the markers."""
    return between(readme, BEGIN, END, table(root), "README.md")


TARGETS = {"README.md": render,
           "docs/experiments.md": lambda text: between(text, "<!-- estimate:begin -->", "<!-- estimate:end -->",
                                                       estimate_examples(), "docs/experiments.md"),
           "docs/serving.md": lambda text: between(
               between(text, "<!-- pg-repeat:begin -->", "<!-- pg-repeat:end -->", pg_repeat(), "docs/serving.md"),
               "<!-- replicas:begin -->", "<!-- replicas:end -->", replicas(), "docs/serving.md")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file disagrees")
    args = ap.parse_args(argv)
    bad = 0
    for rel, fn in TARGETS.items():
        path = ROOT / rel
        old = path.read_text()
        new = fn(old)
        if args.check:
            if old != new:
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel,
                                                           "generated"))
                bad = 1
            continue
        if old != new:
            path.write_text(new)
        print(f"{rel}: " + ("updated" if old != new else "already up to date"))
    return bad


if __name__ == "__main__":
    sys.exit(main())
