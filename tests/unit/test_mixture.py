"""Mixture of LoRAs: the router starts as the uniform mix, saturates to one adapter, trains alone, and on a
two-task toy set beats each single adapter and the uniform mix (the embedded-model study: docs/mixture.md)."""
import pytest
import torch

from lorakit import LoraConfig, add_adapter, set_active
from lorakit.core.inject import mark_trainable, set_routing
from lorakit.config import TrainConfig
from lorakit.core.mixture import Router, lm_loss, uniform_routing
from lorakit.train.data import Example
from lorakit.train.router import train_router
from lorakit.models import tiny_llama


def _two(model):
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(r=2, alpha=2, targets=["q_proj", "up_proj"], init_lora_weights=False), "b")


def test_router_starts_uniform_and_saturates(ids):
    m = tiny_llama()
    _two(m)
    set_active(m, uniform_routing(["a", "b"]))
    uniform = m(ids).logits
    set_active(m, "a")
    only_a = m(ids).logits
    router = Router(m, ["a", "b"])
    router.attach(m)
    assert (m(ids).logits - uniform).abs().max() < 1e-5  # zero-initialised gates: 1/K each
    with torch.no_grad():
        for g in router.gates.values():
            g.bias.copy_(torch.tensor([30.0, -30.0]))  # all mass on "a"
    assert (m(ids).logits - only_a).abs().max() < 1e-4
    set_routing(m, None)
    assert (m(ids).logits - only_a).abs().max() < 1e-6  # detached: the active set runs again


def _task_batch(task: int, n: int, g: torch.Generator) -> dict:
    """task 0: tokens count up by 1 after a marker 5; task 1: count down after a marker 6."""
    start = torch.randint(20, 100, (n, 1), generator=g)
    steps = torch.arange(8)[None] * (1 if task == 0 else -1)
    seq = torch.cat([torch.full((n, 1), 5 + task), start + steps], dim=1)
    labels = seq.clone()
    labels[:, :2] = -100  # loss once the direction is fixed
    return {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": labels}


def _row_losses(m, batch) -> torch.Tensor:
    """Mean next-token loss of each row (rows,): every row has the same number of target tokens."""
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return tok.sum(1) / (labels != -100).sum(1)


def _beyond_noise(diff: torch.Tensor, z: float = 3.0) -> bool:
    """A paired difference (one value per held-out row) is above zero by more than z standard errors of its
    mean: the margin comes from the rows' own spread, not from a number measured once."""
    return bool(diff.mean() > z * diff.std() / diff.numel() ** 0.5)


def test_trained_router_beats_single_adapters_and_uniform_mix(tmp_path, caplog):
    caplog.set_level("INFO", logger="lorakit.train")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = tiny_llama()
    for k, name in enumerate(["up", "down"]):
        add_adapter(m, LoraConfig(r=8, alpha=16, targets="all-linear"), name)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(60):
            b = _task_batch(k, 16, g)
            lm_loss(m(input_ids=b["input_ids"]).logits, b["labels"]).backward()
            opt.step()
            opt.zero_grad()
    mark_trainable(m, None)
    frozen = {n: p.clone() for n, p in m.named_parameters()}

    def mixed(n):
        a, b = _task_batch(0, n, g), _task_batch(1, n, g)
        return {k: torch.cat([a[k], b[k]]) for k in a}

    test = mixed(64)
    scores = {}
    for label, active in [("up", "up"), ("down", "down"), ("uniform", uniform_routing(["up", "down"]))]:
        set_active(m, active)
        scores[label] = _row_losses(m, test)
    set_active(m, ["up", "down"])
    router = Router(m, ["up", "down"])
    rows = mixed(8 * 60)  # 2 epochs of 60 steps of 16 rows, through the one training loop
    examples = [Example(i.tolist(), lab.tolist()) for i, lab in zip(rows["input_ids"], rows["labels"])]
    res = train_router(m, router, examples, tmp_path / "router",
                       cfg=TrainConfig(lr=5e-2, batch_size=16, warmup_ratio=0.0, max_grad_norm=0.0, epochs=2))
    losses = res.losses
    assert len(losses) == 120 and losses[-1] < losses[0]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "shared prefix off (a router trains on the adapters' per-token mix)" in said, said
    assert (tmp_path / "router" / "router.safetensors").exists()
    assert Router.load(m, tmp_path / "router").state_dict().keys() == router.state_dict().keys()
    router.attach(m)
    scores["router"] = _row_losses(m, test)
    means = {k: round(float(v.mean()), 4) for k, v in scores.items()}
    for other in ("up", "down", "uniform"):  # the router's held-out loss is below each, row by row, beyond noise
        assert _beyond_noise(scores[other] - scores["router"]), (other, means)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters())  # only the router trained
    # the gates tell the tasks apart once the direction is visible
    layer = m.model.layers[1].self_attn.q_proj
    seen = []
    set_routing(m, lambda lay, x, base: (seen.append(router.gate_values(lay, x)) if lay is layer else None)
                or router(lay, x))
    m(input_ids=test["input_ids"])
    gates = seen[0][:, 3:].mean(1)  # (rows, K) after the first steps
    # "up" rows (the first 64) weigh the "up" adapter more than "down" rows do, beyond the rows' spread
    up, down = gates[:64, 0], gates[64:, 0]
    se = (up.var() / up.numel() + down.var() / down.numel()) ** 0.5
    assert up.mean() - down.mean() > 3 * se, (float(up.mean()), float(down.mean()), float(se))


def test_save_load_and_bad_input(tmp_path, ids):
    m = tiny_llama()
    _two(m)
    router = Router(m, ["a", "b"])
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    router.attach(m)
    want = m(ids).logits
    router.save(tmp_path / "router")
    set_routing(m, None)
    Router.load(m, tmp_path / "router").attach(m)
    assert torch.equal(m(ids).logits, want)
    with pytest.raises(ValueError, match="at least two adapters"):
        Router(m, ["a"])
    with pytest.raises(ValueError, match="'zzz'"):
        Router(m, ["a", "zzz"])
    add_adapter(m, LoraConfig(r=2, targets=["v_proj"], use_dora=True), "d")
    with pytest.raises(ValueError, match="'d' uses DoRA"):
        Router(m, ["a", "d"])
    with pytest.raises(FileNotFoundError, match="router.safetensors"):
        Router.load(m, tmp_path / "nothing")
