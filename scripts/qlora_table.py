#!/usr/bin/env python3
"""docs/variants.md's QLoRA quality table (bench/qlora_quality.py), from a committed
bench/results/qlora_quality_*.jsonl (never typed by hand). `--write` replaces the text between
<!-- qlora-quality:begin --> and <!-- qlora-quality:end --> in docs/variants.md; `--check` exits 1 if it differs.

    python scripts/qlora_table.py [bench/results/qlora_quality_....jsonl (default: RESULTS)] [--write | --check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import doc_markers  # noqa: E402

DOC = ROOT / "docs" / "variants.md"
RESULTS = "bench/results/qlora_quality_cpu-2core_2026-12-05.jsonl"  # the run the doc shows
BEGIN, END = "<!-- qlora-quality:begin -->", "<!-- qlora-quality:end -->"
WHAT = {
    "nf4+adapter": "the 4-bit base + the adapter, unmerged (what it was trained on)",
    "merged-nf4-bf16": "`lorakit merge`: the 4-bit base dequantized, + the delta in fp32, rounded once to bf16",
    "gguf-bf16": "that merged model as `lorakit export --outtype bf16` writes it, read back",
    "merged-full-bf16": "the adapter merged into the full-precision base instead (`--base-quant none`), bf16",
    "base-nf4": "the 4-bit base alone",
    "base-full": "the full-precision base alone",
}


def table(rel: str, root: Path = ROOT) -> str:
    """The markdown for the result file `rel` (a path from the project root)."""
    rows = {r["case"]: r for r in (json.loads(x) for x in (root / rel).read_text().splitlines() if x.strip())}
    first = next(iter(rows.values()))
    t = first["train"]
    out = ["| case | model | held-out loss | exact match (95% interval) | answers unlike the 4-bit base + adapter's |",
           "|---|---|---|---|---|"]
    for case, r in rows.items():
        lo, hi = r["accuracy_95"]
        diff = r["answers_differ_from_nf4_adapter"]
        diff = "-" if diff is None else f"{diff} of {r['n']}"
        out.append(f"| {case} | {WHAT.get(case, case)} | {r['loss']:.4f} | {100 * r['accuracy']:.0f}% "
                   f"({100 * lo:.0f}-{100 * hi:.0f}%) | {diff} |")
    out.append("")
    ref = rows.get("nf4+adapter")
    for case, what in (("merged-nf4-bf16", "merged into its own (dequantized) base"),
                       ("merged-full-bf16", "moved to the full-precision base")):
        if ref and case in rows:
            r = rows[case]
            out.append(f"- The adapter {what}: held-out loss {r['loss'] - ref['loss']:+.4f} "
                       f"({100 * (r['loss'] / ref['loss'] - 1):+.1f}%), exact match "
                       f"{100 * (r['accuracy'] - ref['accuracy']):+.0f} points against the 4-bit base + adapter"
                       + ("" if r is ref or r["accuracy"] == ref["accuracy"] else
                          " (the two exact matches' 95% intervals overlap: one seed, 100 rows)"
                          if r["accuracy_95"][1] >= ref["accuracy_95"][0] and ref["accuracy_95"][1] >= r["accuracy_95"][0]
                          else " (95% intervals apart)") + ".")
    out.append(f"- Training: `lorakit train --quantize nf4` on {first['data']} with {first['lora']}, {t['steps']} "
               f"steps, loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}, {t['train_s']:.0f} s of training on the shared cores; {first['n']} "
               f"held-out rows, greedy answers, every model computing in fp32.")
    out.append(f"- Machine {first['machine']}, torch {first['torch']}, transformers {first['transformers']}, "
               f"{first['date']}; file: [{rel}](../{rel}) (one run, one seed).")
    return "\n".join(out)


def render(text: str, body: str) -> str:
    return doc_markers.render(text, BEGIN, END, body, str(DOC))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="?", default=RESULTS)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    body = table(Path(args.results).resolve().relative_to(ROOT).as_posix())
    return doc_markers.emit(DOC, BEGIN, END, body, args.write, args.check)


if __name__ == "__main__":
    sys.exit(main())
