#!/usr/bin/env python3
"""Markdown tables of the GPU training runs, from committed bench/results/gpu_train_*.jsonl files (never typed by
hand). `--write FILE` replaces the text between <!-- gpu-table:NAME:begin --> and <!-- gpu-table:NAME:end -->.

    python scripts/gpu_tables.py bench/results/gpu_train_h200_2026-11-29_r*.jsonl [--write docs/gpu.md --name r3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

LABEL = {"lorakit": "lorakit fast module", "cli": "`lorakit train` (CLI)", "peft": "PEFT"}


def label(r: dict) -> str:
    v = r.get("variant") or {}
    name = LABEL.get(r["tool"], r["tool"])
    if r["tool"] == "lorakit" and r.get("mode") == "qlora":  # bench/gpu_train.py setup_lorakit_qlora
        name = "lorakit loop, plain backend, in process"
    if r["tool"] == "peft":
        name += " bf16 adapters" if v.get("bf16") == "1" else " defaults (fp32 adapters)"
        name += " + Liger" if v.get("liger") == "1" else ""
    extra = [f"{k}={x}" for k, x in v.items() if k not in ("bf16", "liger")]
    return name + (f" ({', '.join(extra)})" if extra else "")


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if "tokens_per_s" in r]
    out = ["| case | tool | tokens/s | peak allocated GiB | peak reserved GiB | loss step 1 | loss last | "
           "share of matmul rate | file |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["case"], r["tool"] != "peft", -r["tokens_per_s"])):
        res = r.get("reserved_gib")
        share = r.get("mfu_vs_gemm")
        out.append(f"| {r['case']} | {label(r)} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
                   f"{'-' if res is None else f'{res:.2f}'} | {r['loss_first']:.4f} | {r['loss_last']:.4f} "
                   f"(step {len(r.get('losses') or []) or '?'}) | {'-' if share is None else f'{share:.0%}'} | "
                   f"{r['_file']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--write")
    ap.add_argument("--name", default="main")
    a = ap.parse_args()
    rows = read(a.files)
    md = table(rows)
    if not a.write:
        print(md)
        return 0
    return doc_markers.emit(Path(a.write), f"<!-- gpu-table:{a.name}:begin -->", f"<!-- gpu-table:{a.name}:end -->",
                            md, write=True, check=False)


def read(files: list[str]) -> list[dict]:
    return doc_markers.read_rows(files)


if __name__ == "__main__":
    sys.exit(main())
