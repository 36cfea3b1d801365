"""lorakit.train.fast on CPU in fp32 (eager): the same losses and gradients as the plain path
(HF forward + LoraLinear), the same 20-step loss curve, and clear errors for what it does not do."""
import copy

import pytest
import torch

from lorakit import LoraConfig, add_adapter, set_active
from lorakit.train import fast
from lorakit.train.fast.fuse import fuse_projections, stacked, unfuse_projections
from lorakit.models import tiny_llama


def lora_model(seed=0, dropout=0.0, r=4, tie=False, init_std=0.02):
    model = tiny_llama(seed, init_std=init_std)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    torch.manual_seed(seed + 1)
    add_adapter(model, LoraConfig(r=r, alpha=2 * r, dropout=dropout, targets="all-linear",
                                  init_lora_weights=False))
    return model


def ids(seed=3, b=2, s=12):
    return torch.randint(3, 128, (b, s), generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def compare(plain, fm, x, labels=None, mask=None, seed=0):
    torch.manual_seed(seed)
    l1 = plain(input_ids=x, labels=x if labels is None else labels, attention_mask=mask).loss
    l1.backward()
    torch.manual_seed(seed)
    l2 = fm(x, labels=labels, attention_mask=mask)
    l2.backward()
    assert abs(l1.item() - l2.item()) < 1e-5 * abs(l1.item())
    for a, b in zip(trainable(plain), trainable(fm.model)):
        assert float((a.grad - b.grad).abs().max()) <= 1e-5 * float(a.grad.abs().max()) + 1e-8


@pytest.mark.parametrize("kw", [{}, {"wide": False}, {"fuse": False}, {"recompute_layers": 1},
                                {"fused_mlp": True}, {"fused_mlp": True, "recompute_layers": 1}])
def test_loss_and_adapter_grads_match_plain_path(kw):
    plain = lora_model().train()
    fm = fast.prepare(copy.deepcopy(plain), compile=False, **kw).train()
    compare(plain, fm, ids())


def test_dropout_masks_follow_the_plain_path_order():
    plain = lora_model(dropout=0.2).train()
    fm = fast.prepare(copy.deepcopy(plain), compile=False).train()
    compare(plain, fm, ids(), seed=11)


def test_partial_targets_and_labels_with_ignored_positions():
    model = tiny_llama(0)
    torch.manual_seed(1)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False))
    plain = model.train()
    fm = fast.prepare(copy.deepcopy(plain), compile=False).train()
    x = ids()
    labels = x.clone()
    labels[:, :5] = -100  # prompt tokens out of the loss
    compare(plain, fm, x, labels=labels)


def test_full_fine_tuning_with_tied_embeddings():
    plain = tiny_llama(0)
    plain.config.tie_word_embeddings = True
    plain.lm_head.weight = plain.model.embed_tokens.weight
    for p in plain.parameters():
        p.requires_grad_(True)
    plain.train()
    fm = fast.prepare(copy.deepcopy(plain), compile=False).train()
    assert fm.model.lm_head.weight is fm.model.model.embed_tokens.weight
    compare(plain, fm, ids())


def test_right_padding_mask_matches_hf_and_left_padding_is_refused():
    plain = lora_model().train()
    fm = fast.prepare(copy.deepcopy(plain), compile=False).train()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, 8:] = 0
    labels = x.masked_fill(mask == 0, -100)
    compare(plain, fm, x, labels=labels, mask=mask)
    with pytest.raises(ValueError, match="right-padded"):
        fm(x, attention_mask=mask.flip(1))


def test_twenty_steps_same_loss_curve_and_it_falls():
    plain = lora_model(r=8, init_std=0.2).train()  # weights large enough to learn fast
    fm = fast.prepare(copy.deepcopy(plain), compile=False).train()
    opt_p = torch.optim.AdamW(trainable(plain), lr=1e-2)
    opt_f = fast.adamw(fm, lr=1e-2)
    data = [ids(seed=s, b=2, s=12) for s in range(3)]
    curves = ([], [])
    for step in range(20):
        x = data[step % 3]
        for curve, fn, opt in ((curves[0], lambda t: plain(input_ids=t, labels=t).loss, opt_p),
                               (curves[1], fm, opt_f)):
            loss = fn(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
    gaps = [abs(a - b) / a for a, b in zip(*curves)]
    assert max(gaps) < 1e-4, gaps
    assert curves[1][-1] < 0.85 * curves[1][0]


def test_fused_weights_are_views_and_unfuse_restores():
    model = tiny_llama(0)
    x = ids()
    before = model(input_ids=x).logits
    attn = model.model.layers[0].self_attn
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert stacked(qkv) is None
    assert fuse_projections(model) == 4  # 2 layers x (q/k/v, gate/up)
    w, _ = stacked(qkv)
    assert w.shape == (64 + 32 + 32, 64)
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)
    assert torch.equal(w[64:96], attn.k_proj.weight)  # one storage
    with torch.no_grad():
        attn.k_proj.weight.div_(2)
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-6)
    unfuse_projections(model)
    assert stacked(qkv) is None
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-6)


def test_adapters_become_float32_for_a_bf16_base():
    model = tiny_llama(0, dtype=torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    fm = fast.prepare(model, compile=False)
    assert {p.dtype for p in fm.trainable_parameters()} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    loss = fm(ids())
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fm.trainable_parameters())


def test_unsupported_setups_are_value_errors():
    model = lora_model()
    add_adapter(model, LoraConfig(r=2, alpha=4, targets="all-linear"), name="other")
    set_active(model, ["default", "other"])
    with pytest.raises(ValueError, match="active adapters"):
        fast.prepare(model, compile=False)
    dora = tiny_llama(0)
    add_adapter(dora, LoraConfig(r=2, alpha=4, targets=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        fast.prepare(dora, compile=False)
    other = tiny_llama(0)
    other.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model types"):
        fast.prepare(other, compile=False)
    with pytest.raises(ValueError, match="recompute_layers"):
        fast.prepare(tiny_llama(0), compile=False, recompute_layers=5)
    with pytest.raises(ValueError, match="nothing to train"):
        fast.adamw(fast.prepare(tiny_llama(0), compile=False))
