"""Every kind of run goes through `lorakit train` (one loop): QLoRA with --quantize nf4, DoRA with recompute, and
the mixture router with `lorakit train-router`; `lorakit inspect` says what each output is."""
import json

import pytest
import torch

from lorakit.adapters.peft_files import content_sha256
from lorakit.adapters.mixtures import load_mixture
from lorakit.generate import generate
from lorakit.models import load_base
from lorakit.train.data import build_examples, load_rows
from lorakit.train.evaluate import loss_and_kl
from test_cli import lorakit  # noqa: F401 (the same subprocess helper)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    up = [{"prompt": f"Say the word {w}.", "completion": w.upper()} for w in ["apple", "river", "stone", "cloud"] * 4]
    rev = [{"prompt": f"Spell {w} backwards.", "completion": w[::-1]} for w in ["apple", "river", "stone", "cloud"] * 4]
    for name, rows in (("up", up), ("rev", rev), ("mixed", up + rev)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_qlora_trains_from_the_cli_and_inspect_says_so(tiny_dir, two_tasks, tmp_path):
    out = tmp_path / "q"
    p = lorakit("train", "--model", tiny_dir, "--data", two_tasks / "up.jsonl", "--quantize", "nf4", "--r", 8,
                "--targets", "all-linear", "--lr", 5e-3, "--max-steps", 12, "--batch-size", 8, "-o", out)
    assert "backend: plain (device is cpu" in p.stderr  # auto says which backend and why
    losses = _losses(out)
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    info = json.loads(lorakit("inspect", out, "--json").stdout)
    assert info["metadata"]["base_quant"] == "nf4" and info["ranks"] == [8]
    # merged where it was trained: the 4-bit base dequantized, in bf16 (tests/unit/test_qlora_merge.py: the numbers)
    p = lorakit("merge", "--model", tiny_dir, "--adapter", out, "-o", tmp_path / "merged")
    assert "into the dequantized nf4 base" in p.stdout
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16} and not any("lora" in k for k in saved)


def test_dora_with_recompute_trains_and_fast_refuses_it(tiny_dir, two_tasks, tmp_path):
    out = tmp_path / "dora"
    lorakit("train", "--model", tiny_dir, "--data", two_tasks / "up.jsonl", "--dora", "--grad-checkpointing",
            "--lr", 5e-3, "--max-steps", 6, "--batch-size", 8, "-o", out)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["train"]["recompute"] == "all" and cfg["backend"] == "plain"
    p = lorakit("train", "--model", tiny_dir, "--data", two_tasks / "up.jsonl", "--dora", "--backend", "fast",
                "--max-steps", 2, "-o", tmp_path / "no", check=False)
    assert p.returncode == 2 and "DoRA" in p.stderr and not (tmp_path / "no" / "adapter_config.json").exists()


def test_router_trains_from_the_cli_through_the_same_loop(tiny_dir, two_tasks, tmp_path):
    for name in ("up", "rev"):
        lorakit("train", "--model", tiny_dir, "--data", two_tasks / f"{name}.jsonl", "--targets", "all-linear",
                "--lr", 5e-3, "--max-steps", 8, "--batch-size", 8, "--quiet", "-o", tmp_path / name)
    out = tmp_path / "mix"
    p = lorakit("train-router", "--model", tiny_dir, "--adapters", f"{tmp_path / 'up'},{tmp_path / 'rev'}",
                "--data", two_tasks / "mixed.jsonl", "--max-steps", 10, "--batch-size", 8, "--lr", 2e-2, "-o", out)
    assert "done: 10 steps" in p.stdout
    losses = _losses(out)
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert json.loads((out / "train_config.json").read_text())["what"] == "router"
    info = json.loads(lorakit("inspect", out, "--json").stdout)
    assert info["kind"] == "mixture" and info["adapters"] == ["up", "rev"] and info["routed_layers"] == 14
    assert info["params"] == 2 * (6 * (64 * 2 + 2) + (128 * 2 + 2))  # a (K x in) gate + bias per adapted layer
    assert [(a["name"], a["status"]) for a in info["adapter_files"]] == [("up", "ok"), ("rev", "ok")]
    assert info["adapter_files"][0]["sha256"] == content_sha256(tmp_path / "up")
    assert info["base_shape_hash"] and info["training"]["steps"] == 10

    # eval and generate take the mixture where they take an adapter; the numbers are load_mixture's
    p = lorakit("eval", "--model", tiny_dir, "--adapter", out, "--data", two_tasks / "mixed.jsonl",
                "--max-new-tokens", 4, "--json", tmp_path / "rep.json")
    rep = json.loads((tmp_path / "rep.json").read_text())
    model, tok = load_base(tiny_dir, device="cpu")
    load_mixture(model, out)
    examples = build_examples(tok, load_rows(two_tasks / "mixed.jsonl")[0], "auto", 512)
    want = loss_and_kl(model, examples, tok.pad_token_id, 32, compare=True)
    assert abs(rep["after"]["loss"] - want["loss"]) < 1e-4 and abs(rep["before"]["loss"] - want["base_loss"]) < 1e-4
    assert rep["after"]["loss"] < rep["before"]["loss"] - 0.1  # the mixture, not the base
    g = lorakit("generate", "--model", tiny_dir, "--adapter", out, "--prompt", "Say the word apple.",
                "--max-new-tokens", 4, "--json")
    assert json.loads((out / "mixture.json").read_text())["template"] == "chat"  # train-router's --template auto
    want_text = generate(model, tok, [[{"role": "user", "content": "Say the word apple."}]], max_new_tokens=4)[0]
    assert json.loads(g.stdout)["text"] == want_text  # rendered as the router's rows were: a chat turn

    # a mixture cannot be merged or stacked, and a changed adapter is named
    p = lorakit("merge", "--model", tiny_dir, "--adapter", out, "-o", tmp_path / "merged", check=False)
    assert p.returncode == 2 and "cannot be merged" in p.stderr
    p = lorakit("generate", "--model", tiny_dir, "--adapter", out, "--adapter", tmp_path / "up", "--prompt", "x",
                check=False)
    assert p.returncode == 2 and "runs alone" in p.stderr
    lorakit("train", "--model", tiny_dir, "--data", two_tasks / "up.jsonl", "--targets", "all-linear",
            "--max-steps", 1, "--batch-size", 8, "--quiet", "-o", tmp_path / "rev")  # rev retrained: other files
    p = lorakit("eval", "--model", tiny_dir, "--adapter", out, "--data", two_tasks / "mixed.jsonl", check=False)
    assert p.returncode == 2 and "adapter 'rev', whose files at" in p.stderr and "changed" in p.stderr
    info = json.loads(lorakit("inspect", out, "--json").stdout)
    assert [a["status"] for a in info["adapter_files"]] == ["ok", "changed"]
