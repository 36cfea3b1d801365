#!/usr/bin/env python3
"""Markdown table of the mixed-adapter kernel bench (bench/gpu_serve_kernels.py: one llama-1b layer's seven
projections, timed from CUDA graphs), from committed bench/results/gpu_serve_kernels_*.jsonl files. `--write`
replaces the text between <!-- gpu-kernels:NAME:begin --> and <!-- gpu-kernels:NAME:end --> of docs/serving.md;
`--check` exits 1 where the doc differs.

    python scripts/kernel_table.py bench/results/gpu_serve_kernels_h100_2026-12-06.jsonl [--write|--check] [--name k1]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "serving.md"
IMPLS = {"base": "base matmuls only", "reference": "plain torch (gather + bmm)",
         "triton": "Triton, two launches a projection, delta added after", "inplace": "Triton, two launches a "
         "projection, added in place (the engine before 2026-12-06)", "grouped": "Triton grouped: q/k/v and "
         "gate/up one launch pair each, in place", "folded": "folded: slots' A inside the base matmul + one expand"}


def label(impl: str) -> str:
    if impl.startswith("triton["):
        return f"Triton, two launches a projection, config {impl[7:-1]}"
    return IMPLS.get(impl, impl)


def table(rows: list[dict]) -> str:
    out = ["| case | implementation | ms a layer (graph) | x base-only | adapter GB/s | rel. error | file |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r.get("err") is None else f"{r['err']:.1e}"
        vs = "-" if r.get("vs_base_graph") is None else f"{r['vs_base_graph']:.2f}"
        gbs = "-" if r.get("lora_gbs") is None else f"{r['lora_gbs']:,.0f}"
        out.append(f"| {r['case']} | {label(r['impl'])} | {r['ms_graph']:.4f} | {vs} | {gbs} | {err} | {r['_file']} |")
    first = rows[0] if rows else {}
    out.append("")
    out.append(f"{first.get('device', '?')}, torch {first.get('torch', '?')}, triton {first.get('triton', '?')}, "
               f"{first.get('shape', '?')} {first.get('dtype', '?')}, rank {first.get('r', '?')}, "
               f"{first.get('slots', '?')} slots; decode: {first.get('rows', '?')} rows of one token.")
    return "\n".join(out)


def read(files: list[str]) -> list[dict]:
    return doc_markers.read_rows(files, lambda r: r.get("bench") == "gpu_serve_kernels" and r.get("ms_graph"))


def main() -> int:
    return doc_markers.cli(DOC, "gpu-kernels", "k1", lambda files: table(read(files)))


if __name__ == "__main__":
    sys.exit(main())
