#!/usr/bin/env python3
"""Markdown table of the real-data GPU training runs (bench/gpu_train_data.py), from committed
bench/results/gpu_train_data_*.jsonl files (never typed by hand). `--write FILE` replaces the text between
<!-- gpu-data:NAME:begin --> and <!-- gpu-data:NAME:end -->. Runs that recorded their allocations (variant
snap=1: slowed by the recording) are left out of the speed table; where there are any, a second table gives each
one's peak and the sources of what was live at that peak (gpu_train.MemTrace).

    python scripts/gpu_data_table.py bench/results/gpu_train_data_h200_2026-12-05.jsonl [--write docs/gpu.md --name r1]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

LABEL = {"lorakit": "lorakit loop (`lorakit train`)", "peft-liger": "PEFT bf16 adapters + Liger, padded",
         "peft": "PEFT defaults, padded"}
PEER = "peft-liger"


def label(r: dict) -> str:
    v = {k: x for k, x in (r.get("variant") or {}).items() if k not in ("tool", "prof")}
    name = LABEL.get(r["tool"], r["tool"])
    if r["tool"] == "lorakit":
        name += ", packed" if v.get("pack", "1") == "1" else ", padded (--no-pack)"
        v.pop("pack", None)
    return name + (f" ({', '.join(f'{k}={x}' for k, x in v.items())})" if v else "")


def losses_at(r: dict) -> str:
    ls = r.get("losses") or []
    if not ls:
        return "-"
    at = sorted({1, len(ls) // 2, len(ls)})
    return ", ".join(f"{ls[i - 1]:.3f}" for i in at) + f" (steps {', '.join(map(str, at))})"


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if "tokens_per_s" in r and not r.get("mem_trace")]
    peer = {r["case"]: r for r in ok if r["tool"] == PEER}
    out = ["| case | tool | real tokens/s | x PEFT+Liger | peak allocated / reserved GiB | median step ms | "
           "worst step ms (x median) | loss | file |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["case"], r["tool"] != PEER, -r["tokens_per_s"])):
        p = peer.get(r["case"])
        x = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        out.append(f"| {r['case']} | {label(r)} | {r['tokens_per_s']:,.0f} | {x} | {r['peak_alloc_gib']:.2f} / "
                   f"{r['peak_reserved_gib']:.2f} | {r['step_ms_median']:.1f} | {r['step_ms_worst']:.1f} "
                   f"({r['worst_over_median']:.2f}) | {losses_at(r)} | {r['_file']} |")
    for r in rows:
        if "tokens_per_s" not in r and not r.get("mem_trace"):
            out.append(f"| {r['case']} | {label(r)} | {r.get('error') or r.get('skipped')} | | | | | | {r['_file']} |")
    return "\n".join(out)


def source(site: str) -> str:
    """A trace's source line, with inductor's generated file names (hash-named) shortened to `compiled graph`."""
    return re.sub(r"^\w+/c\w{40,}\.py:(\d+) call$", r"compiled graph (line \1)", site)


def mem_table(rows: list[dict], top: int = 6) -> str:
    """The runs with a memory trace: peak allocated (the run's and the replayed trace's) and the `top` sources of
    what was live at the trace's peak, GiB (count of allocations); "" where no run has one."""
    snap = [r for r in rows if r.get("mem_trace")]
    if not snap:
        return ""
    out = [f"| case | tool | peak allocated GiB (run / trace) | live at the trace's peak, by source: GiB (allocations), "
           f"top {top} | file |", "|---|---|---|---|---|"]
    for r in snap:
        m = r["mem_trace"]
        srcs = "; ".join(f"{source(site)} {gib:.3f} ({n})" for site, gib, n in m["top"][:top])
        out.append(f"| {r['case']} | {label(r)} | {r['peak_alloc_gib']:.3f} / {m['peak_gib']:.3f} | {srcs} | "
                   f"{r['_file']} |")
    return "\n".join(out)


def body(rows: list[dict]) -> str:
    """What --write puts between the markers: the speed table, and the memory table where there is one."""
    mem = mem_table(rows)
    return table(rows) + (f"\n\n{mem}" if mem else "")


def read(files: list[str]) -> list[dict]:
    return doc_markers.read_rows(files)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--write")
    ap.add_argument("--name", default="main")
    a = ap.parse_args()
    md = body(read(a.files))
    if not a.write:
        print(md)
        return 0
    return doc_markers.emit(Path(a.write), f"<!-- gpu-data:{a.name}:begin -->", f"<!-- gpu-data:{a.name}:end -->",
                            md, write=True, check=False)


if __name__ == "__main__":
    sys.exit(main())
