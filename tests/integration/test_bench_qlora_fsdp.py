"""bench/gpu_qlora_fsdp.py --dry-run: issue 28's two-GPU cases on tiny shapes, CPU processes and gloo: one JSON line
a case and a summary; offloading the shards or replicating the adapters changes where tensors live, not the losses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = ["tiny-random/fsdp2", "tiny-random/fsdp2-offload", "tiny-q/fsdp2", "tiny-q/fsdp2-replicate"]


@pytest.mark.slow
def test_dry_run_offload_and_replicate_cases(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora_fsdp.py"), "--dry-run", "--out", str(tmp_path),
                        "--warmup", "1", "--steps", "2", "--runs", *RUNS], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == [json.loads(x) for x in p.stdout.splitlines()]
    by = {r["case"]: r for r in rows[:-1]}
    assert list(by) == RUNS and rows[-1]["summary"] and rows[-1]["70b"]["case"] == "tiny-random/fsdp2", rows[-1]
    for base, variant, key, value in (("tiny-random/fsdp2", "tiny-random/fsdp2-offload", "offload", True),
                                      ("tiny-q/fsdp2", "tiny-q/fsdp2-replicate", "adapter_state", "replicate")):
        a, b = by[base], by[variant]
        assert "error" not in a and "error" not in b, (a, b)
        assert len(a["losses"]) == 3 and a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=2e-5)  # 5 decimals
        assert b["sharded"][key] == value and a["sharded"][key] != value
        flag = "--offload params" if key == "offload" else "--adapter-state replicate"
        assert flag in b["command"] and flag not in a["command"]
    assert by["tiny-q/fsdp2-replicate"]["sharded"]["replicated_bytes"] > 0
