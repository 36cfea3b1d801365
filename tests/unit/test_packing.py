"""Packed rows (issue 23): a micro-batch's rows concatenated with no padding give the padded batch's loss, target
count and adapter gradients, on both backends, for LoRA and DoRA, with and without the shared prefix; the loop's
curve under gradient accumulation is the padded loop's; packed widths come from a few buckets.

Tolerances. fp32: the packed and padded forwards do the same sums over the same keys in another order and
blocking, so they differ by rounding alone: u = 2^-24 per operation, a few hundred operations deep in a
2-layer model's forward and backward -> loss within 1e-5 relative, each gradient within 1e-5 of its largest
entry (~170 u). bf16 (u = 2^-8): the same argument with 8 significant bits -> loss within 4u relative and
gradients within 16u of their largest entry (a difference in rounding, not in the maths, stays a few u).
"""
import itertools
import json
import random

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.config import TrainConfig
from lorakit.models import tiny_llama
from lorakit.train.backends import FastBackend, PlainBackend
from lorakit.train.data import IGNORE, Example, choose_widths, collate, pack, width_for
from lorakit.train.batches import MicroBatches
from lorakit.train.loop import train

HEAD = list(range(40, 60))  # a shared "system prompt" of 20 tokens
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4 * 2.0 ** -8, 16 * 2.0 ** -8)}


def rows(n=8, seed=0, head=HEAD, lo=2, hi=30):
    g = random.Random(seed)
    out = []
    for _ in range(n):
        q = [g.randrange(3, 128) for _ in range(g.randrange(lo, hi))]
        comp = [g.randrange(3, 128) for _ in range(g.randrange(1, 8))]
        out.append(Example(head + q + comp, [IGNORE] * (len(head) + len(q)) + comp))
    return out


def model(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    m = tiny_llama(init_std=0.2)
    add_adapter(m, LoraConfig(**{"r": 4, "alpha": 8, "targets": "all-linear", **lora}))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained-looking adapter: A's gradient is not zero
    return m.to(dtype).train()


def loss_and_grads(backend, m, batch):
    m.zero_grad(set_to_none=True)
    loss, n = backend.loss(batch, 1.0)
    loss.backward()
    return loss.float().item(), n, {k: p.grad.float().clone() for k, p in m.named_parameters() if p.grad is not None}


def assert_close(a, b, dtype):
    (la, na, ga), (lb, nb, gb) = a, b
    tl, tg = TOL[dtype]
    assert na == nb
    assert abs(la - lb) <= tl * abs(la)
    assert ga.keys() == gb.keys() and any("lora_A" in k for k in ga)
    for k in ga:
        assert float((ga[k] - gb[k]).abs().max()) <= tg * float(ga[k].abs().max()) + 1e-12, k


def test_pack_keeps_each_rows_positions_and_targets():
    ex = rows(5)
    b = pack(ex, pad_id=0, width=256)
    lens = [len(e.input_ids) for e in ex]
    assert b["seq_lens"] == tuple(lens) + (256 - sum(lens),)
    at = 0
    for e, n in zip(ex, lens):
        assert b["input_ids"][0, at:at + n].tolist() == e.input_ids
        assert b["position_ids"][0, at:at + n].tolist() == list(range(n))
        assert b["labels"][0, at] == IGNORE and b["labels"][0, at + 1:at + n].tolist() == e.labels[1:]
        at += n
    assert (b["labels"][0, at:] == IGNORE).all()
    assert MicroBatches.count(b) == MicroBatches.count(collate(ex, 0)) == sum(
        sum(x != IGNORE for x in e.labels[1:]) for e in ex)


def test_a_rank_without_targets_gets_targets_at_the_same_width():
    """Under DDP/FSDP a rank whose packed micro-batch predicts nothing still runs a forward and backward (weighted
    zero): every token after a segment's first becomes a target and the width (a compiled shape) is unchanged;
    rows of one token each get one more."""
    from lorakit.train.distributed import all_targets

    ex = [Example(e.input_ids, [IGNORE] * len(e.labels)) for e in rows(2)]
    b = pack(ex, pad_id=0, width=128)
    got = all_targets({**b, "n_targets": 0})
    assert got["input_ids"].shape == (1, 128) and got["input_ids"].equal(b["input_ids"])
    starts = set(itertools.accumulate((0,) + b["seq_lens"][:-1]))
    assert got["n_targets"] == 128 - len(starts) == len(got["target_pos"])
    assert {p + 1 for p in got["target_pos"]} == set(range(128)) - starts
    one = pack([Example([7], [IGNORE]), Example([9], [IGNORE])], pad_id=0)
    got = all_targets({**one, "n_targets": 0})
    assert got["input_ids"].tolist() == [[7, 7, 9]] and got["seq_lens"] == (2, 1) and got["target_pos"] == (0,)
    assert got["position_ids"].tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [{}, {"use_dora": True}])
@pytest.mark.parametrize("share", [False, True])
def test_plain_backend_packed_equals_padded(dtype, lora, share):
    m = model(dtype, **lora)
    ex = rows(8)
    padded = PlainBackend(m, share_prefix=share)
    ref = loss_and_grads(padded, m, collate(ex, 0))
    packed = PlainBackend(m, share_prefix=share)
    assert packed.pack
    got = loss_and_grads(packed, m, pack(ex, 0))
    packed.close()
    assert_close(ref, got, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_backend_packed_equals_padded(dtype):
    m = model(dtype)
    be = FastBackend(m, device=torch.device("cpu"))
    ex = rows(6, seed=1)
    pb = collate(ex, 0)
    pb["unpadded"] = False
    ref = loss_and_grads(be, m, pb)
    got = loss_and_grads(be, m, pack(ex, 0, width=width_for(sum(len(e.input_ids) for e in ex), [256])))
    assert_close(ref, got, dtype)


def test_flex_block_mask_equals_the_dense_mask():
    """The BlockMask built from row boundaries (CUDA's path) attends exactly like the dense mask (CPU's), checked
    with FlexAttention's eager forward on the CPU over layouts with rows across, inside and on block borders."""
    from torch.nn.attention.flex_attention import flex_attention

    from lorakit.train.fast.packing import DocMasks, dense_doc_mask

    g = torch.Generator().manual_seed(0)
    masks = DocMasks(use_flex=True)
    for lens in [(384,), (128, 256), (5, 123, 1, 127, 128), (300, 50, 34), (1,) * 10 + (374,)]:
        q = torch.randn(1, 4, 384, 16, generator=g)
        kv = torch.randn(1, 2, 384, 16, generator=g)
        with torch.no_grad():
            got = flex_attention(q, kv, kv, block_mask=masks(lens), enable_gqa=True)
            ref = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=dense_doc_mask(lens),
                                                                   enable_gqa=True)
        assert float((got - ref).abs().max()) <= 1e-5


def test_choose_widths_is_the_fewest_padded_tokens():
    g = random.Random(0)
    for _ in range(20):
        totals = [g.randrange(200, 1500) for _ in range(g.randrange(1, 30))]
        for k in (1, 2, 3):
            widths = choose_widths(totals, k, align=64)
            assert len(widths) <= k and all(w % 64 == 0 for w in widths) and max(widths) >= max(totals)
            cands = sorted({-(-t // 64) * 64 for t in totals})

            def pad(ws):
                return sum(width_for(t, sorted(ws)) - t for t in totals)
            best = min(pad(c) for r in range(1, k + 1) for c in itertools.combinations(cands, r)
                       if max(c) == cands[-1])
            assert pad(widths) == best


@pytest.mark.parametrize("backend", ["plain", "fast"])
def test_loop_curve_with_accumulation_equals_padded(tmp_path, backend):
    """Packing changes no number of the run: the same rows, targets per step (the global count under
    accumulation) and losses at every step as the padded loop's."""
    ex = rows(24, seed=2)
    curves = {}
    for packed in (False, True):
        out = tmp_path / f"{backend}-{packed}"
        cfg = TrainConfig(batch_size=3, grad_accum=2, max_steps=6, lr=1e-2, warmup_ratio=0.0, backend=backend,
                          pack=packed, group_by_length=False)
        train(model(), None, ex, out, LoraConfig(r=4, alpha=8, targets="all-linear"), cfg, progress=False,
              save_final=False)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[packed] = [(r["loss"], r["tokens"]) for r in recs]
    assert [t for _, t in curves[True]] == [t for _, t in curves[False]]
    for (a, _), (b, _) in zip(curves[False], curves[True]):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_no_pack_says_why(tmp_path, caplog):
    caplog.set_level("INFO", logger="lorakit.train")
    cfg = TrainConfig(batch_size=4, max_steps=1, pack=False)
    train(model(), None, rows(4), tmp_path, LoraConfig(r=4, alpha=8), cfg, progress=False, save_final=False)
    assert "packing: off (turned off (--no-pack))" in caplog.text


@pytest.mark.slow
def test_compiled_run_never_recompiles_after_warm_up(tmp_path, caplog, monkeypatch):
    """torch.compile on the CPU (the fast path's graphs, a dense document mask) over rows of 5-120 tokens: the
    loop compiles its few packed widths (2 here, to keep the compile time down) before step 1 and not one frame
    after it."""
    from torch._dynamo.utils import counters

    from lorakit.train import packing

    monkeypatch.setattr(packing, "MAX_SHAPES", 2)
    caplog.set_level("INFO", logger="lorakit.train")
    m = model()
    be = FastBackend(m, device=torch.device("cpu"), compile=True)
    frames = {}

    def on_step(step, loss):
        frames[step] = sum(counters["frames"].values())
    cfg = TrainConfig(batch_size=4, epochs=2, lr=1e-2, warmup_ratio=0.0)
    ex = rows(40, seed=3, head=[], lo=5, hi=120)
    assert len({sum(len(e.input_ids) for e in ex[i:i + 4]) for i in range(0, 40, 4)}) > 4  # many batch sizes
    train(m, None, ex, tmp_path, LoraConfig(r=4, alpha=8, targets="all-linear"), cfg, progress=False,
          save_final=False, on_step=on_step, backend=be)
    assert "compiled 2 packed widths" in caplog.text and max(frames) == 20
    assert frames[1] > 0 and frames[1] == frames[20], frames
