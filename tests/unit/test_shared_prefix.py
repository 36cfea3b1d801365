"""The shared-prefix forward (train/prefix.py): the leading tokens every row shares run once, and the loss and
every adapter gradient equal the full forward's; the loop's loss curve is unchanged; where it cannot apply it
stays off."""
import json

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.config import TrainConfig
from lorakit.models import tiny_llama
from lorakit.train.backends import PlainBackend, causal_lm_loss
from lorakit.train.data import IGNORE, Example, collate
from lorakit.train.loop import train
from lorakit.train.prefix import shared_prefix_len

HEAD = [1, 17, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2]  # a "system prompt"


def _rows(n=24, seed=0, head=HEAD):
    """Rows: the shared head, a varying question, then a completion that counts up."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        q = torch.randint(3, 128, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        start = int(torch.randint(10, 100, (1,), generator=g))
        comp = [start + k for k in range(5)]
        out.append(Example(head + q + comp, [IGNORE] * (len(head) + len(q)) + comp))
    return out


def _model(seed=0, **lora):
    torch.manual_seed(seed)
    m = tiny_llama(init_std=0.2)
    add_adapter(m, LoraConfig(**{"r": 4, "alpha": 8, "targets": "all-linear", **lora}))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained-looking adapter: B's gradient alone would hide A's
    return m.train()


def _loss_and_grads(m, batch, share):
    m.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(m, batch, None, share)
    loss.backward()
    return loss.item(), n, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"use_rslora": True}, {"dropout": 0.0, "r": 8}])
def test_loss_and_gradients_equal_the_full_forward(lora):
    m = _model(**lora)
    batch = collate(_rows(8), pad_id=0)
    p = shared_prefix_len(batch)
    assert p == len(HEAD)
    full_loss, n1, full = _loss_and_grads(m, batch, False)
    shared_loss, n2, shared = _loss_and_grads(m, batch, True)
    assert n1 == n2 == 8 * 5
    assert abs(full_loss - shared_loss) < 1e-5 * abs(full_loss)
    assert full.keys() == shared.keys() and any("lora_A" in k for k in full)
    for k in full:
        scale = full[k].abs().max().item()
        assert scale > 0, k
        assert (full[k] - shared[k]).abs().max().item() < 1e-4 * scale, k


def test_prefix_length_rules():
    rows = _rows(4)
    assert shared_prefix_len(collate(rows, 0)) == len(HEAD)
    assert shared_prefix_len(collate(rows[:1], 0)) == 0                     # one row: nothing to share
    assert shared_prefix_len(collate(_rows(4, head=HEAD[:5]), 0)) == 0        # too short to pay for a second call
    # a target inside the common head: the prefix stops before the position that predicts it
    t = [Example(e.input_ids, [IGNORE] * 10 + [e.input_ids[10]] + e.labels[11:]) for e in rows]
    assert shared_prefix_len(collate(t, 0), min_len=1) == 9
    # a row that is the head and two tokens: at least one own token stays in every row
    short = Example(HEAD + [5, 6], [IGNORE] * (len(HEAD) + 1) + [6])
    assert shared_prefix_len(collate(rows[:3] + [short], 0)) == len(HEAD)
    # left padding breaks the common prefix (padding is never shared)
    batch = collate(rows, 0)
    batch["attention_mask"][1, 0] = 0
    assert shared_prefix_len(batch) == 0


def test_loop_curve_is_the_full_forward_curve(tmp_path):
    curves = {}
    for share in (True, False):
        m = tiny_llama(init_std=0.2)
        cfg = TrainConfig(lr=2e-2, max_steps=16, batch_size=8, backend="plain", share_prefix=share)
        res = train(m, None, _rows(48), tmp_path / str(share), LoraConfig(r=4, alpha=8, targets="all-linear"),
                    cfg, progress=False)
        curves[share] = res.losses
    assert curves[True][-1] < 0.8 * curves[True][0]  # it learns
    assert max(abs(a - b) / abs(a) for a, b in zip(curves[True], curves[False])) < 1e-4
    rows = [json.loads(x) for x in (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)


def test_off_where_it_cannot_apply(caplog):
    m = _model()
    assert PlainBackend(m, share_prefix=True).share_prefix
    assert not PlainBackend(m, share_prefix=False).share_prefix
    with caplog.at_level("INFO", logger="lorakit.train"):
        b = PlainBackend(m, recompute="all", share_prefix=True)
    assert not b.share_prefix and "recompute" in caplog.text
    b.close()
    m.config.sliding_window = 8  # Llama's attention has no window (arch.windows): the prefix may be shared
    assert PlainBackend(m, share_prefix=True).share_prefix
    m.config.model_type = "mistral"  # whose layers attend through it
    assert not PlainBackend(m, share_prefix=True).share_prefix
