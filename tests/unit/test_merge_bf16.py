"""bf16 merge: W0 + dW formed in float32 and rounded once; unmerge bit for bit from the kept copy.

How close, measured here on a tiny Llama with an all-linear r=8 adapter: the merged bf16 model is as
close to the float32 computation as the unmerged bf16 model is (both carry bf16's 8-bit rounding; the
merged one rounds W + dW once instead of rounding W x and B A x separately). Unmerge restores every
base weight exactly (torch.equal); without the kept copy each weight is within one bf16 rounding step.
"""
import pytest
import torch

from lorakit import LoraConfig, add_adapter, merge, unmerge
from lorakit.core.inject import lora_layers, unload
from lorakit.models import tiny_llama


def _pair(seed=0):
    """The same adapter on a float32 and a bfloat16 copy of one tiny model (bf16-exact values in both)."""
    m32, m16 = tiny_llama(seed), tiny_llama(seed, dtype=torch.bfloat16)
    for m in (m32, m16):
        torch.manual_seed(seed)
        add_adapter(m, LoraConfig(r=8, alpha=16, targets="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora_layers(m32), lora_layers(m16)):
            for k in ("lora_A", "lora_B"):
                getattr(b.adapters["default"], k).copy_(getattr(a.adapters["default"], k))
                getattr(a.adapters["default"], k).copy_(getattr(b.adapters["default"], k).float())
            a.weight.copy_(b.weight.float())
    return m32, m16


@torch.no_grad()
def test_bf16_merge_is_as_close_to_fp32_as_unmerged_and_unmerge_is_exact(ids):
    m32, m16 = _pair()
    ref = m32(ids).logits
    unmerged = m16(ids).logits.float()
    base = {k: v.clone() for k, v in m16.state_dict().items() if "adapters" not in k}
    merge(m16)
    merged = m16(ids).logits.float()
    err_u, err_m = (unmerged - ref).abs(), (merged - ref).abs()
    assert err_m.max() <= 2 * err_u.max() and err_m.mean() <= 2 * err_u.mean()
    assert err_m.max() < 0.05 * ref.abs().max()  # bf16 noise, not a wrong merge
    unmerge(m16)
    for k, v in base.items():
        assert torch.equal(m16.state_dict()[k], v), k  # bit for bit
    assert torch.equal(m16(ids).logits.float(), unmerged)
    assert all(layer.original is None for _, layer in lora_layers(m16))  # the copy is dropped


@torch.no_grad()
def test_unmerge_without_copy_within_one_bf16_step(ids):
    _, m16 = _pair(1)
    base = {k: v.float().clone() for k, v in m16.state_dict().items() if "adapters" not in k}
    merge(m16, keep_original=False)
    assert all(layer.original is None for _, layer in lora_layers(m16))
    wm = {k: m16.state_dict()[k].float().clone() for k in base}
    unmerge(m16)
    for k, v in base.items():
        err = (m16.state_dict()[k].float() - v).abs()
        assert (err <= 2.0 ** -8 * (wm[k].abs() + v.abs()) + 1e-30).all(), k


@torch.no_grad()
def test_merge_refuses_non_finite_result_and_changes_nothing(ids):
    m = tiny_llama(0)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    layers = [layer for _, layer in lora_layers(m)]
    layers[-1].adapters["default"].lora_A.fill_(1.0)
    layers[-1].adapters["default"].lora_B.fill_(3e38)  # only the last layer overflows
    with pytest.raises(ValueError, match="non-finite"):
        merge(m)
    assert all(not layer.merged for layer in layers)  # the layers merged before it were undone
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) or "lora_" in k, k
    unload(m)
