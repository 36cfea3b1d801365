"""On a GPU, `lorakit train` (the CLI, auto backend) takes the fast backend, says so, and its loss curve equals
the plain backend's within the bf16 tolerance of test_fast_gpu.py; the same run through `train()` with
backend="plain" is the reference. Rows: a pre-tokenized data file of fixed-length rows, as in bench/gpu_train.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gpu_helpers import VOCAB, small_llama_config

ROOT = Path(__file__).resolve().parents[2]


def _model_dir(tmp_path) -> Path:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = small_llama_config(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    d = tmp_path / "model"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                  pad_token="t0", eos_token="t1", bos_token="t2")
    tok.save_pretrained(d)
    return d


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_cli_auto_takes_fast_backend_and_matches_plain_curve(tmp_path):
    d = _model_dir(tmp_path)
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(3, VOCAB, (256,), generator=g).tolist()} for _ in range(16)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(d), "--data", str(tmp_path / "rows.jsonl"), "--r", "16", "--alpha", "32", "--targets",
              "all-linear", "--lr", "1e-3", "--batch-size", "4", "--max-steps", "20", "--max-len", "256",
              "--dtype", "bfloat16", "--device", "cuda", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    runs = {}
    for backend in ("auto", "plain"):
        out = tmp_path / backend
        p = subprocess.run([sys.executable, "-m", "lorakit", "train", *common, "--backend", backend, "-o", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[backend] = (out, p.stderr)
    assert "backend: fast (CUDA and a supported llama model)" in runs["auto"][1]
    fast, plain = _losses(runs["auto"][0]), _losses(runs["plain"][0])
    assert len(fast) == len(plain) == 20
    gaps = [abs(a - b) for a, b in zip(fast, plain)]
    assert gaps[0] < 0.01 and max(gaps) < 0.05 and sum(gaps) / len(gaps) < 0.02, gaps
    assert abs((fast[0] - fast[-1]) - (plain[0] - plain[-1])) < 0.1 * abs(plain[0] - plain[-1])
    rec = [json.loads(x) for x in (runs["auto"][0] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(r["backend"] == "fast" and r["cuda_peak_alloc_gib"] > 0 for r in rec)


def test_shared_prefix_on_cuda_matches_the_full_forward():
    """The plain backend's shared-prefix forward (train/prefix.py) on CUDA in bf16: the loss and the adapter
    gradients of rows with a common head equal the full forward's within bf16 rounding."""
    from lorakit import LoraConfig, add_adapter
    from lorakit.models import tiny_llama
    from lorakit.train.backends import causal_lm_loss
    from lorakit.train.data import IGNORE, Example, collate

    torch.manual_seed(0)
    m = tiny_llama(init_std=0.2).to("cuda", torch.bfloat16)
    add_adapter(m, LoraConfig(r=8, alpha=16, targets="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    m.train()
    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 128, (40,), generator=g).tolist()
    rows = []
    for _ in range(8):
        q = torch.randint(3, 128, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        rows.append(Example(head + q + [7, 8, 9], [IGNORE] * (40 + len(q)) + [7, 8, 9]))
    batch = {k: v.cuda() for k, v in collate(rows, 0).items()}
    out = []
    for share in (False, True):
        m.zero_grad(set_to_none=True)
        loss, _ = causal_lm_loss(m, batch, None, share)
        loss.backward()
        out.append((loss.item(), {k: p.grad.float().clone() for k, p in m.named_parameters() if p.grad is not None}))
    assert abs(out[0][0] - out[1][0]) < 2e-2 * abs(out[0][0])
    for k, full in out[0][1].items():
        err = (full - out[1][1][k]).norm() / full.norm()
        assert err < 5e-2, (k, float(err))
