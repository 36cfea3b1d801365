#!/usr/bin/env python3
"""The measured table of docs/distributed.md, from a committed bench/results/gpu_dist_*.jsonl (never typed by hand).
`--write FILE` replaces the text between <!-- dist-table:begin --> and <!-- dist-table:end -->."""
import json
import re
import sys
from pathlib import Path


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    cases = {r["case"]: r for r in rows if "case" in r and "tokens_per_s" in r}
    summary = next((r for r in rows if r.get("summary")), {})
    out = ["| case | processes | parallel | per-GPU batch | recompute | tokens/s (global) | peak allocated GiB (per GPU) | "
           "peak reserved GiB | loss step 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in cases.items():
        out.append(f"| {name} | {r['processes']} | {r['parallel']} | {r['batch_per_gpu']} x {r['seq']} | "
                   f"{r['recompute']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['reserved_gib']:.2f} | "
                   f"{r['losses'][0]:.4f} |")
    out.append("")
    for k in ("1b", "8b", "8b-full"):
        s = summary.get(k)
        if s:
            out.append(f"- {k} ({s['vs']}): tokens/s {s['speedup']:.3f}x, per-GPU peak {s['peak_ratio']:.3f}x; "
                       f"goal {s['goal']}: {'met' if s['met'] else 'NOT met'}.")
    out.append(f"- Device: {summary.get('gpus')} x {summary.get('device')}, torch {summary.get('torch')}, "
               f"transformers {summary.get('transformers')}, {summary.get('date')}; file: `{path.as_posix()}`.")
    return "\n".join(out)


def main() -> int:
    path = Path(sys.argv[1])
    md = table(path)
    if len(sys.argv) > 3 and sys.argv[2] == "--write":
        doc = Path(sys.argv[3])
        t = doc.read_text()
        b, e = "<!-- dist-table:begin -->", "<!-- dist-table:end -->"
        doc.write_text(re.sub(re.escape(b) + ".*?" + re.escape(e), lambda _: f"{b}\n{md}\n{e}", t, flags=re.S))
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
