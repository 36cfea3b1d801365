"""The embedded SmolLM2-135M: PEFT interop with equal logits, exact merge/unmerge, and a short training run
that lowers the held-out loss of the demo task."""
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, add_adapter, delete_adapter, disabled, load_adapter, merge, save_adapter, unmerge

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_tok(embedded):
    model, tok = embedded
    yield model, tok
    from lorakit.core.inject import adapter_names, unload

    unload(model)  # leave the shared session model clean
    assert not adapter_names(model)


def _ids(tok):
    return tok(["The quick brown fox jumps over the lazy dog because", "2+2="], return_tensors="pt",
               padding=True)["input_ids"]


def test_lorakit_adapter_in_peft_and_back(model_tok, tmp_path):
    model, tok = model_tok
    ids = _ids(tok)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=8, alpha=16, targets="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # keep the change moderate, as a trained adapter would
        want = model(ids).logits
        with disabled(model):
            base = model(ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter does something
    save_adapter(model, tmp_path / "ad")
    delete_adapter(model, "default")
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ad")
    with torch.no_grad():
        got = pm(ids).logits
    assert (got - want).abs().max() <= 1e-5
    # and PEFT's own save loads back in lorakit with the same logits
    pm.save_pretrained(tmp_path / "peft_ad")
    model = pm.unload()
    load_adapter(model, tmp_path / "peft_ad")
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() <= 1e-5


def test_merge_unmerge_exact_on_embedded(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, LoraConfig(r=8, alpha=16, targets="all-linear", init_lora_weights=False))
    with torch.no_grad():
        out = model(ids).logits
        merge(model)
        assert (model(ids).logits - out).abs().max() < 1e-3  # fp32: sum order differs only
        unmerge(model)
        w0 = saved["model.layers.3.mlp.down_proj.weight"]
        assert (model.model.layers[3].mlp.down_proj.weight - w0).abs().max() < 1e-6
        assert (model(ids).logits - out).abs().max() < 1e-4
        # unmerge is exact only to fp32 rounding: put the session model's weights back bit for bit,
        # so later tests (and the base's weight hash) see the untouched base
        restored = 0
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
                restored += 1
        assert restored == len(saved)


def test_short_training_lowers_heldout_loss(model_tok, tmp_path):
    from lorakit import TrainConfig
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.evaluate import evaluate_loss
    from lorakit.train.loop import train

    model, tok = model_tok
    rows, _ = load_rows(ROOT / "data" / "demo" / "train.jsonl")
    test, _ = load_rows(ROOT / "data" / "demo" / "test.jsonl")
    ex, held = build_examples(tok, rows[:24]), build_examples(tok, test[:8])
    before = evaluate_loss(model, held, tok.pad_token_id)["loss"]
    res = train(model, tok, ex, tmp_path / "run", LoraConfig(r=8, alpha=16, targets="all-linear"),
                TrainConfig(lr=1e-3, max_steps=6, batch_size=4, warmup_ratio=0.0), progress=False)
    after = evaluate_loss(model, held, tok.pad_token_id)["loss"]
    assert after < 0.7 * before, (before, after, res.losses)
