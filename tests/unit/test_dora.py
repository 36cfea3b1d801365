"""DoRA beyond single-adapter PEFT parity (tests/unit/test_peft_interop.py): several adapters stacked with
weights, exact merge/unmerge (also partial), bf16, and DoRA on the 4-bit base."""
import pytest
import torch

from lorakit import LoraConfig, add_adapter, disabled, merge, set_active, unmerge
from lorakit.core.inject import lora_layers
from lorakit.models import tiny_llama


def _stack(model, dora_b=True):
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False, use_dora=True), "a")
    add_adapter(model, LoraConfig(r=2, alpha=2, targets=["q_proj", "down_proj"], init_lora_weights=False,
                                  use_dora=dora_b), "b")
    add_adapter(model, LoraConfig(r=3, alpha=6, targets=["q_proj", "v_proj"], init_lora_weights=False), "c")
    with torch.no_grad():  # trained magnitudes differ from the initial row norms
        for _, layer in lora_layers(model):
            for p in layer.adapters.values():
                if p.lora_magnitude_vector is not None:
                    p.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(p.lora_magnitude_vector))
    set_active(model, {"a": 0.6, "b": 1.5, "c": -0.4})


def _explicit(layer, x, active):
    """y = x W^T + b + sum_k w_k x dW'_k^T, dW'_k = (g_k - 1) W + g_k s B A, g_k = m / ||W + s B A||_row."""
    W = layer.weight
    y = x @ W.T
    for name, w in active.items():
        if name not in layer.adapters:
            continue
        p = layer.adapters[name]
        d = p.scale * p.lora_B @ p.lora_A
        full = d if p.lora_magnitude_vector is None else \
            (p.lora_magnitude_vector / (W + d).norm(dim=1) - 1)[:, None] * W + \
            (p.lora_magnitude_vector / (W + d).norm(dim=1))[:, None] * d
        y = y + w * x @ full.T
    return y


def test_stacked_dora_matches_formula_and_order_free(ids):
    torch.manual_seed(0)
    m = tiny_llama()
    _stack(m)
    layer = m.model.layers[1].self_attn.q_proj  # a (DoRA), b (DoRA), c (LoRA)
    x = torch.randn(5, 64)
    active = {"a": 0.6, "b": 1.5, "c": -0.4}
    assert (layer(x) - _explicit(layer, x, active)).abs().max() < 1e-5
    out = m(ids).logits
    set_active(m, {"c": -0.4, "b": 1.5, "a": 0.6})  # another order: same model
    assert (m(ids).logits - out).abs().max() < 1e-5
    set_active(m, {"a": 0.0, "b": 0.0, "c": 0.0})  # weight 0 switches a DoRA adapter off, too
    with disabled(m):
        base = m(ids).logits
    assert (m(ids).logits - base).abs().max() < 1e-5


@pytest.mark.parametrize("dora_b", [True, False])
def test_merge_unmerge_exact_with_several_adapters(ids, dora_b):
    torch.manual_seed(1)
    m = tiny_llama()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    _stack(m, dora_b)
    out = m(ids).logits
    tol = 1e-5 * max(1.0, float(out.abs().max()))  # fp32 rounding, relative to the logits' scale
    merge(m, ["b"])  # partial: b merged, a and c still run unmerged on top
    assert (m(ids).logits - out).abs().max() < tol
    merge(m)
    assert all(not layer.active or len(layer.merged) == len(layer.active) for _, layer in lora_layers(m))
    assert (m(ids).logits - out).abs().max() < tol
    merge(m)  # idempotent
    assert (m(ids).logits - out).abs().max() < tol
    unmerge(m)
    sd = m.state_dict()
    assert max((sd[k] - v).abs().max().item() for k, v in w0.items()) < 1e-6
    assert (m(ids).logits - out).abs().max() < 1e-5


def test_dora_bf16_close_to_fp32_and_merge_roundtrip(ids):
    torch.manual_seed(2)
    m32 = tiny_llama()
    _stack(m32)
    m16 = tiny_llama(dtype=torch.bfloat16)
    _stack(m16)
    with torch.no_grad():  # the same adapters, rounded to bf16
        for (_, l32), (_, l16) in zip(lora_layers(m32), lora_layers(m16)):
            for n, p in l32.adapters.items():
                for k, t in p.named_parameters():
                    getattr(l16.adapters[n], k).copy_(t)
                    t.copy_(getattr(l16.adapters[n], k).float())  # both start from bf16-exact values
    assert m16.model.layers[0].self_attn.q_proj.adapters["a"].lora_magnitude_vector.dtype == torch.bfloat16
    out32, out16 = m32(ids).logits, m16(ids).logits.float()
    assert out16.dtype == torch.float32 and (out16 - out32).abs().max() < 0.05 * out32.abs().max()
    base_keys = [k for k in m16.state_dict() if "adapters" not in k]
    w0 = {k: m16.state_dict()[k].float().clone() for k in base_keys}
    merge(m16)
    wm = {k: m16.state_dict()[k].float().clone() for k in base_keys}
    assert (m16(ids).logits.float() - out16).abs().max() < 0.05 * out32.abs().max()
    unmerge(m16)
    # bf16 keeps 8 significant bits: merging rounds W + dW' once, unmerging rounds once more, so each
    # weight comes back within one rounding step of the merged value (measured: rel. Frobenius ~0.1%)
    for k, v in w0.items():
        err = (m16.state_dict()[k].float() - v).abs()
        assert (err <= 2.0 ** -8 * (wm[k].abs() + v.abs()) + 1e-8).all(), k
        assert err.norm() <= 3e-3 * v.norm(), k


def test_dora_on_4bit_base_equals_dense_dequantized_base(ids):
    from lorakit.core.nf4 import dequantize_model, quantize_model

    torch.manual_seed(3)
    q = tiny_llama()
    quantize_model(q)
    dense = tiny_llama()
    quantize_model(dense)
    dequantize_model(dense)  # the same 4-bit values, held densely
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=True)
    torch.manual_seed(4)
    add_adapter(q, cfg)
    torch.manual_seed(4)
    add_adapter(dense, cfg)
    with torch.no_grad():
        for (_, lq), (_, ld) in zip(lora_layers(q), lora_layers(dense)):
            for k, t in ld.adapters["default"].named_parameters():
                t.copy_(getattr(lq.adapters["default"], k))
    assert (q(ids).logits - dense(ids).logits).abs().max() < 1e-5
    q(ids, labels=ids).loss.backward()
    mag = q.model.layers[0].self_attn.q_proj.adapters["default"].lora_magnitude_vector
    assert mag.grad is not None and mag.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="4-bit NF4 base"):
        merge(q)
