"""The one training loop: both backends compute the same thing, `auto` says which it took and why, recompute
changes memory not numbers, fp32 master weights, length-grouped batches, the router through the same loop."""
import json

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.config import TrainConfig
from lorakit.models import tiny_llama
from lorakit.train.backends import choose_backend
from lorakit.train.data import IGNORE, Example
from lorakit.train.batches import MicroBatches, trim_to_targets
from lorakit.train.loop import train


def _examples(n=48, seed=0):
    """Rows of varied length: a prompt of random tokens, then a completion that counts up (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 10, (1,), generator=g))
        start = int(torch.randint(10, 100, (1,), generator=g))
        prompt = torch.randint(3, 128, (p,), generator=g).tolist()
        comp = [start + k for k in range(6)]
        out.append(Example(prompt + comp, [IGNORE] * p + comp))
    return out


def _run(tmp_path, name, backend, **kw):
    model = tiny_llama(init_std=0.2)
    cfg = TrainConfig(lr=2e-2, max_steps=12, batch_size=8, backend=backend, **kw)
    res = train(model, None, _examples(), tmp_path / name, LoraConfig(r=4, alpha=8, targets="all-linear"), cfg,
                progress=False)
    return res, model


def test_fast_backend_gives_the_plain_loss_curve(tmp_path):
    plain, _ = _run(tmp_path, "plain", "plain")
    fast, _ = _run(tmp_path, "fast", "fast")
    assert plain.losses[-1] < 0.8 * plain.losses[0]  # it learns
    gaps = [abs(a - b) / abs(a) for a, b in zip(plain.losses, fast.losses)]
    assert max(gaps) < 1e-4, gaps
    rows = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in rows if "loss" in r} == {"fast"}
    assert json.loads((tmp_path / "fast" / "train_config.json").read_text())["backend"] == "fast"


def test_recompute_changes_no_number(tmp_path):
    a, _ = _run(tmp_path, "a", "plain")
    b, _ = _run(tmp_path, "b", "plain", recompute="all")
    c, _ = _run(tmp_path, "c", "fast", recompute=1)
    assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-5
    assert max(abs(x - y) / x for x, y in zip(a.losses, c.losses)) < 1e-4


def test_auto_says_why_and_fast_refuses_with_the_reason():
    m = tiny_llama()
    add_adapter(m, LoraConfig(r=4, targets="all-linear"))
    backend, why = choose_backend(m, "auto")
    assert backend.name == "plain" and "cpu" in why
    dora = tiny_llama()
    add_adapter(dora, LoraConfig(r=4, targets="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        choose_backend(dora, "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(m, "turbo")


def test_bf16_model_trains_fp32_master_adapters(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16, init_std=0.2)
    res = train(model, None, _examples(16), tmp_path / "bf", LoraConfig(r=4, targets="all-linear"),
                TrainConfig(max_steps=2, batch_size=8, lr=1e-3), progress=False)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the base stays bf16
    assert all(torch.isfinite(torch.tensor(x)) for x in res.losses)


def test_length_grouping_cuts_padding_and_keeps_every_row_once():
    ex = _examples(256)
    plain = MicroBatches(ex, 8, 0, 0, group_by_length=False)
    grouped = MicroBatches(ex, 8, 0, 0, group_by_length=True)
    assert sorted(grouped.order(0)) == list(range(256)) and grouped.order(1) != grouped.order(0)

    def padded(mb):
        return sum(int(b["attention_mask"].numel() - b["attention_mask"].sum())
                   for b in (mb.get(i) for i in range(mb.per_epoch)))
    assert padded(grouped) < 0.3 * padded(plain)
    # split into micro-batches or not, an optimizer step sees the same rows
    two = MicroBatches(ex, 4, 0, 0, group_by_length=True, unit=8)
    assert two.order(0) == grouped.order(0)


def test_trailing_tokens_without_targets_are_dropped():
    e = Example([5, 6, 7, 8, 9], [IGNORE, 6, 7, IGNORE, IGNORE])
    (t,) = trim_to_targets([e])
    assert t.input_ids == [5, 6, 7] and t.labels == [IGNORE, 6, 7]


def test_resume_on_the_same_loop_gives_the_uninterrupted_curve(tmp_path):
    full, _ = _run(tmp_path, "full", "plain")
    model = tiny_llama(init_std=0.2)
    cfg = TrainConfig(lr=2e-2, max_steps=12, batch_size=8, backend="plain", save_every=5)
    stop = {}

    def boom(step, loss):
        if step == 7:
            stop["at"] = step
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(model, None, _examples(), tmp_path / "cut", LoraConfig(r=4, alpha=8, targets="all-linear"), cfg,
              progress=False, on_step=boom)
    again = tiny_llama(init_std=0.2)
    res = train(again, None, _examples(), tmp_path / "cut", LoraConfig(r=4, alpha=8, targets="all-linear"), cfg,
                progress=False, resume=True)
    assert max(abs(a - b) for a, b in zip(full.losses, res.losses)) < 1e-5


def test_fast_backend_names_a_quantized_base_as_the_reason():
    from lorakit.core.nf4 import quantize_model
    from lorakit.train.backends import fast_unsupported

    m = tiny_llama()
    quantize_model(m, "all-linear")
    add_adapter(m, LoraConfig(r=4, targets="all-linear"))
    assert "LoraNF4Linear" in fast_unsupported(m)
    with pytest.raises(ValueError, match="LoraNF4Linear"):
        choose_backend(m, "fast")


def test_activation_memory_budget_changes_no_number_and_is_this_runs_only(tmp_path):
    """cfg.activation_memory_budget (`--activation-memory-budget`) is torch.compile's partitioner budget while the
    run sets up and steps (seen from inside each step), given back after, and refused outside (0, 1]. The fast
    backend compiles only on CUDA, so here it shows the setting reaches the run and leaves the loss curve the
    plain backend's; what the budget saves and costs compiled is measured on a GPU (bench/gpu_train_data.py amb=)."""
    fc = torch._functorch.config
    before, seen = fc.activation_memory_budget, []
    model = tiny_llama(init_std=0.2)
    cfg = TrainConfig(lr=2e-2, max_steps=12, batch_size=8, backend="fast", activation_memory_budget=0.5)
    half = train(model, None, _examples(), tmp_path / "half", LoraConfig(r=4, alpha=8, targets="all-linear"), cfg,
                 progress=False, on_step=lambda step, loss: seen.append(fc.activation_memory_budget))
    assert set(seen) == {0.5} and len(seen) == 12 and fc.activation_memory_budget == before
    plain, _ = _run(tmp_path, "plain", "plain")
    assert max(abs(a - b) / abs(a) for a, b in zip(plain.losses, half.losses)) < 1e-4
    with pytest.raises(ValueError, match="activation_memory_budget"):
        TrainConfig(activation_memory_budget=0.0)
