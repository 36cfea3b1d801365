#!/usr/bin/env python3
"""Markdown table of the GPU serving runs (bench/gpu_serve.py), from committed bench/results/gpu_serve_*.jsonl files
(never typed by hand). `--write` replaces the text between <!-- gpu-serve:NAME:begin --> and
<!-- gpu-serve:NAME:end --> of docs/serving.md; `--check` exits 1 where the doc differs.

    python scripts/serve_table.py bench/results/gpu_serve_h200_2026-12-05.jsonl [--write|--check] [--name r1]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "serving.md"

RATIOS = (("vs_base", "base-only engine"), ("vs_ref", "8 adapters, same requests"),
          ("vs_engine", "engine API, same adapters"))  # each case against its reference row


def ms(r: dict, key: str) -> str:
    a, b = r.get(f"{key}_p50_ms"), r.get(f"{key}_p99_ms")
    return "-" if a is None else f"{a:.1f} / {b:.1f}"


def case_label(r: dict) -> str:
    compiled = r.get("decode_compile") and not r.get("compile_failures")  # a failed compile ran the plain step
    name = r["case"] + (" (compiled step)" if compiled else " (compile failed: plain step)" if r.get("decode_compile")
                        else "")
    name += " (grouped kernels off)" if r.get("grouped") is False and r.get("adapters") else ""
    return f"{name}, {r['api']}" + (f" ({r['client']} client)" if r.get("client") else "")


def ratio(r: dict, rows: list[dict] = ()) -> str:
    for key, what in RATIOS:
        if r.get(key) is not None:
            return f"{r[key]:.2f}x {what}"
    if r.get("decode_compile") and r.get("adapters") and r["case"].startswith("engine-"):
        # a compiled-step case run in its own process: against the compiled base-only row of the same file
        base = next((b for b in rows if b.get("decode_compile") and b.get("case") == "engine-0"
                     and b.get("_file") == r.get("_file") and b.get("device") == r.get("device")), None)
        if base:
            return f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x base-only engine (compiled step, another process)"
    return "-"


def table(rows: list[dict]) -> str:
    out = ["| case | adapters | decode tok/s | end-to-end tok/s | share of bandwidth limit | ratio | TTFT p50 / p99 ms "
           "| ITL p50 / p99 ms | adapter loads (p99 ms) | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r.get('case')} | | error: {r['error'][:80]} | | | | | | | {r['_file']} |")
            continue
        share = "-" if r.get("share_of_limit") is None else f"{r['share_of_limit']:.1%}"
        loads = "-" if not r.get("loads") else f"{r['loads']} ({r['load_ms_p99']:.1f})"
        out.append(f"| {case_label(r)} | {r.get('adapters', 0)} | {r['decode_tok_s']:,.0f} | {r['e2e_tok_s']:,.0f} | "
                   f"{share} | {ratio(r, rows)} | {ms(r, 'ttft')} | {ms(r, 'itl')} | {loads} | {r['_file']} |")
    first = rows[0] if rows else {}
    out.append("")
    out.append(f"{first.get('device', '?')}, torch {first.get('torch', '?')}, shape {first.get('shape', '?')} "
               f"{first.get('dtype', '?')}, {first.get('rows', '?')} concurrent rows, {first.get('prompt', '?')}-token "
               f"prompts, {first.get('new', '?')} new tokens, rank {first.get('r', '?')}; measured copy rate "
               f"{first.get('copy_gbs', '?')} GB/s.")
    return "\n".join(out)


GOALS = (  # (what, case, field, goal): issue 25's goals, each read from the named case's row
    ("base-only decode, share of the bandwidth limit", "engine-0", "share_of_limit", 0.5),
    ("32 mixed adapters, decode x base-only", "engine-32", "vs_base", 0.9),
    ("two-adapter stacks of 32, decode x base-only", "stack2-32", "vs_base", 0.8),
    ("1,000 adapters under Zipf traffic x 8 adapters", "zipf-1000", "vs_ref", 0.8),
)


def goals(rows: list[dict]) -> str:
    """One line per goal: the best row of its case (the table may hold repeats) against the goal, and for a ratio to
    base-only, the ratio bandwidth alone would allow: base-only's bytes a step over the case's (weights, KV cache
    and the batch's adapters read once)."""
    base = next((r for r in rows if r.get("case") == "engine-0" and r.get("step_bytes")), None)
    out = ["| goal | measured | target | met | bound by bytes read |", "|---|---|---|---|---|"]
    for what, case, field, target in GOALS:
        got = [r for r in rows if r.get("case") == case and r.get(field) is not None and not r.get("decode_compile")]
        if not got:
            out.append(f"| {what} | not run | {target:.2f} | - | - |")
            continue
        best = max(got, key=lambda r: r[field])
        bound = "-"
        if field == "vs_base" and base and best.get("step_bytes"):
            bound = f"{base['step_bytes'] / best['step_bytes']:.2f}"
        out.append(f"| {what} | {best[field]:.2f} | {target:.2f} | {'yes' if best[field] >= target else 'no'} "
                   f"| {bound} |")
    return "\n".join(out)


def read(files: list[str]) -> list[dict]:
    return doc_markers.read_rows(files, lambda r: r.get("bench") == "gpu_serve")


def main() -> int:
    return doc_markers.cli(DOC, "gpu-serve", "r1", lambda files: (lambda rows: table(rows) + "\n\n" + goals(rows))(
        read(files)))


if __name__ == "__main__":
    sys.exit(main())
