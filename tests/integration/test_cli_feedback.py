"""What a person sees from the CLI: no library deprecation noise, progress bars on eval, --quiet silent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses

ROOT = Path(__file__).resolve().parents[2]


def lorakit(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    from lorakit import LoraConfig, add_adapter, load_base, save_adapter
    from lorakit.templates import template_info

    root = tmp_path_factory.mktemp("fb")
    model, tok = load_base(str(tiny_dir), device="cpu")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, targets="all-linear", init_lora_weights=False))
    save_adapter(model, root / "ad", metadata=template_info(tok))
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("apple", "river", "stone")]
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_no_deprecation_noise(tiny_dir, adapter):
    p = lorakit("generate", "--model", tiny_dir, "--adapter", adapter / "ad", "--prompt", "hi", "--max-new-tokens", 3)
    assert p.stdout.strip()
    for noise in ("Warning", "deprecated", "[transformers]", "Loading weights"):
        assert noise not in p.stderr, p.stderr
    loud = lorakit("generate", "--model", tiny_dir, "--adapter", adapter / "ad", "--prompt", "hi", "--max-new-tokens",
                   3, "--verbose")
    assert loud.stdout == p.stdout and "Loading weights" in loud.stderr  # --verbose shows the libraries again


def test_eval_progress_and_quiet(tiny_dir, adapter, tmp_path):
    args = ["eval", "--model", tiny_dir, "--adapter", adapter / "ad", "--data", adapter / "t.jsonl",
            "--max-new-tokens", 3, "--batch-size", 1]
    loud = lorakit(*args)
    assert "answers (adapter)" in loud.stderr and "3/3" in loud.stderr and "accuracy" in loud.stdout
    quiet = lorakit(*args, "--quiet", "--json", tmp_path / "r.json")
    assert quiet.stdout == "" and quiet.stderr == ""
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 3
