"""bench/gpu_dist.py --dry-run: the 2-GPU bench's cases on tiny shapes, CPU processes and gloo, one JSON line each."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_one_line_per_case_and_a_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_dist.py"), "--dry-run", "--out", str(tmp_path),
                        "--warmup", "1", "--steps", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "gpu_dist.jsonl").read_text().splitlines()]
    assert rows == [json.loads(x) for x in p.stdout.splitlines()]
    one, two, summary = rows
    assert (one["case"], one["processes"], two["case"], two["processes"]) == ("tiny/1", 1, "tiny/fsdp2", 2)
    assert two["parallel_line"].startswith("parallel: fsdp over 2 processes")
    for r in (one, two):
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3 and r["device"] == "cpu", r
        assert r["command"].startswith("lorakit train ") and "--no-save" in r["command"]
    assert summary["summary"] and summary["tiny"]["vs"] == "tiny/fsdp2 / tiny/1" and summary["tiny"]["speedup"] > 0
