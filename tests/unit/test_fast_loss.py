"""Chunked linear + cross-entropy equals logits + F.cross_entropy (values and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.fast.loss import default_chunk, linear_cross_entropy, shift_targets


def _inputs(T=37, d=16, V=53, seed=0, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=w_grad)
    t = torch.randint(0, V, (T,), generator=g)
    t[::5] = -100  # ignored positions
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_matches_cross_entropy_and_grads(chunk):
    h, w, t = _inputs()
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    out = linear_cross_entropy(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(out * 1.0, (h, w))
    assert abs(out.item() - ref.item()) < 1e-12
    assert torch.allclose(gh, gh_ref, rtol=0, atol=1e-12)
    assert torch.allclose(gw, gw_ref, rtol=0, atol=1e-12)


def test_incoming_gradient_scales_and_frozen_weight_gets_none():
    h, w, t = _inputs(w_grad=False)
    ref = F.cross_entropy(h @ w.t(), t)
    (gh_ref,) = torch.autograd.grad(ref * 3.0, (h,))
    out = linear_cross_entropy(h, w, t, chunk=5)
    (out * 3.0).backward()
    assert torch.allclose(h.grad, gh_ref, atol=1e-12)
    assert w.grad is None


def test_float32_close_to_reference():
    h, w, t = _inputs(T=64, d=32, V=300)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(h.detach() @ w.detach().t(), t)
    out = linear_cross_entropy(h32, w32, t, chunk=16)
    out.backward()
    assert abs(out.item() - ref.item()) < 1e-5
    h.grad = None
    F.cross_entropy(h @ w.detach().t(), t).backward()
    assert float((h32.grad.double() - h.grad).abs().max()) < 1e-6


def test_all_ignored_gives_nan_like_torch():
    h, w, t = _inputs()
    t[:] = -100
    out = linear_cross_entropy(h, w, t, chunk=8)
    assert math.isnan(out.item()) and math.isnan(F.cross_entropy(h @ w.t(), t).item())


def test_shift_targets_is_hf_shift():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    assert shift_targets(labels).tolist() == [6, 7, -100, -100, 9, -100]


def test_bad_inputs_are_value_errors():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="same d"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, chunk=0)


def test_default_chunk_is_a_power_of_two_near_budget():
    c = default_chunk(128256)
    assert c == 2048 and c & (c - 1) == 0
    assert default_chunk(10) >= 256
