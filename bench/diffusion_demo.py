"""The diffusion demo as a benchmark: `lorakit diffusion-demo` with its defaults, timed, on this machine.

Writes the figures (new-digit shares before/after and at adapter weights 0.5 / 1.0, the rank sweep against full
fine-tuning, PEFT round trip, seconds, the machine's load average before and after) to
bench/results/diffusion_<machine>_<date>.json and the sample grids to docs/diffusion/*.png.

    python bench/diffusion_demo.py [--threads 2] [--fresh] [--machine cpu-2core] [--out DIR]

--fresh trains the base in a new cache directory (the time of a first run); without it a cached base is used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="train the base in a new cache (first-run time)")
    ap.add_argument("--machine", default=f"cpu-{os.cpu_count()}core")
    ap.add_argument("--out", help="demo output dir (default: a temp dir)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    from lorakit.lab.diffusion_demo import DemoOptions, format_summary, run_demo

    tmp = Path(tempfile.mkdtemp(prefix="lorakit-diffusion-"))
    out = Path(args.out) if args.out else tmp / "demo"
    opts = DemoOptions(out=str(out), threads=args.threads, cache=str(tmp / "cache") if args.fresh else None)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    res = run_demo(opts, progress=not args.quiet)
    wall = time.perf_counter() - t0
    res["bench"] = {"wall_seconds": round(wall, 1), "fresh_base": args.fresh, "machine": args.machine,
                    "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "date": datetime.date.today().isoformat()}
    results = ROOT / "bench" / "results" / f"diffusion_{args.machine}_{datetime.date.today().isoformat()}.json"
    results.write_text(json.dumps(res, indent=2) + "\n")
    docs = ROOT / "docs" / "diffusion"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("grid.png", "sweep_grid.png"):
        if (out / name).exists():
            shutil.copyfile(out / name, docs / name)
    print(format_summary(res))
    print(f"wall {wall:.0f} s, load average before {load_before[0]:.1f}; wrote {results.relative_to(ROOT)} "
          f"and docs/diffusion/*.png")
    if not args.out:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
