import pytest
import torch

from lorakit import (LoraConfig, add_adapter, delete_adapter, disabled, merge, set_active, trainable_report,
                     unload, unmerge)
from lorakit.core.inject import LoraLinear, count_params, find_targets, lora_layers


def test_fresh_adapter_changes_nothing_and_only_ab_train(tiny, ids):
    ref = tiny(ids).logits
    paths = add_adapter(tiny, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    assert len(paths) == 4  # 2 layers x (q, v)
    assert torch.equal(tiny(ids).logits, ref)  # B = 0
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    t, total = count_params(tiny)
    assert t == 4 * 4 * (64 + 64) - 2 * 4 * (64 - 32)  # q: 64->64, v: 64->32 (2 kv heads of 16)
    assert trainable_report(tiny).startswith(f"trainable params: {t:,} of {total:,}")


def test_forward_matches_explicit_formula(tiny, ids):
    cfg = LoraConfig(r=4, alpha=12, targets=["q_proj"], init_lora_weights=False)
    add_adapter(tiny, cfg)
    layer = tiny.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    p = layer.adapters["default"]
    want = x @ layer.weight.T + (12 / 4) * (x @ p.lora_A.T) @ p.lora_B.T
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def test_rslora_scale(tiny):
    add_adapter(tiny, LoraConfig(r=16, alpha=8, targets=["q_proj"], use_rslora=True))
    layer = tiny.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].scale == pytest.approx(8 / 4)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_exact(tiny, ids, dora):
    base_w = tiny.model.layers[1].mlp.down_proj.weight.clone()
    add_adapter(tiny, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False, use_dora=dora))
    out = tiny(ids).logits
    merge(tiny)
    merged = tiny(ids).logits
    assert (merged - out).abs().max() < 1e-5
    merge(tiny)  # idempotent
    assert torch.equal(tiny(ids).logits, merged)
    unmerge(tiny)
    assert (tiny.model.layers[1].mlp.down_proj.weight - base_w).abs().max() < 1e-6
    assert (tiny(ids).logits - out).abs().max() < 1e-5


def test_all_linear_skips_head(tiny):
    paths = find_targets(tiny, "all-linear")
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_regex_targets(tiny):
    paths = find_targets(tiny, r".*layers\.1\.self_attn\.(q|k)_proj")
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_bad_config_and_targets(tiny):
    with pytest.raises(ValueError, match="r=0"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="r=-2"):
        LoraConfig(r=-2)
    with pytest.raises(ValueError, match="'qq_proj'"):
        add_adapter(tiny, LoraConfig(targets=["qq_proj"]))
    with pytest.raises(ValueError, match="nothing_here"):
        add_adapter(tiny, LoraConfig(targets="nothing_here"))
    assert not list(lora_layers(tiny))  # nothing half-applied


def test_several_adapters_switch_stack_delete(tiny, ids):
    ref = tiny(ids).logits
    add_adapter(tiny, LoraConfig(r=2, targets=["q_proj"], init_lora_weights=False), "a")
    add_adapter(tiny, LoraConfig(r=4, targets=["v_proj", "o_proj"], init_lora_weights=False), "b")
    set_active(tiny, "a")
    out_a = tiny(ids).logits
    set_active(tiny, "b")
    out_b = tiny(ids).logits
    assert not torch.allclose(out_a, out_b)
    set_active(tiny, {"a": 1.0, "b": 1.0})
    both = tiny(ids).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    with disabled(tiny):
        torch.testing.assert_close(tiny(ids).logits, ref)
    # weighted stack equals scaling each delta: weight 0 for b is just a
    set_active(tiny, {"a": 1.0, "b": 0.0})
    torch.testing.assert_close(tiny(ids).logits, out_a)
    with pytest.raises(ValueError, match="'c'"):
        set_active(tiny, "c")
    with pytest.raises(ValueError, match="finite number"):
        set_active(tiny, {"a": "x"})
    delete_adapter(tiny, "b")
    set_active(tiny, "a")
    torch.testing.assert_close(tiny(ids).logits, out_a)


def test_unload_restores_plain_linear(tiny, ids):
    add_adapter(tiny, LoraConfig(r=4, targets="all-linear", init_lora_weights=False))
    out = tiny(ids).logits
    unload(tiny, merge_active=True)
    assert not any(isinstance(m, LoraLinear) for m in tiny.modules())
    assert "model.layers.0.self_attn.q_proj.weight" in tiny.state_dict()
    assert (tiny(ids).logits - out).abs().max() < 1e-5


def test_lora_gradients_flow_only_to_adapter(tiny, ids):
    add_adapter(tiny, LoraConfig(r=4, targets="all-linear"))
    tiny(ids, labels=ids).loss.backward()
    for n, p in tiny.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B starts at zero so A's grad is zero at step 0; B's is not
    b_grads = [p.grad.abs().sum() for n, p in tiny.named_parameters() if n.endswith("lora_B")]
    assert all(g > 0 for g in b_grads)


def test_deleting_last_adapter_restores_plain_linear(tiny, ids):
    ref = tiny(ids).logits
    add_adapter(tiny, LoraConfig(r=2, targets=["q_proj"], init_lora_weights=False), "a")
    add_adapter(tiny, LoraConfig(r=2, targets=["q_proj", "v_proj"], init_lora_weights=False), "b")
    delete_adapter(tiny, "b")
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, LoraLinear)
    assert type(tiny.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    delete_adapter(tiny, "a")
    assert not list(lora_layers(tiny))
    torch.testing.assert_close(tiny(ids).logits, ref)


def test_one_accessor_gives_each_modules_rank_alpha_and_scale():
    import math

    from lorakit import LoraConfig

    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"layers.1.v_proj": 2.0})
    assert (cfg.rank_for("model.layers.0.q_proj"), cfg.alpha_for("model.layers.0.q_proj")) == (4, 16.0)
    assert cfg.scale_for("model.layers.0.q_proj") == 16 / 4 and cfg.scale_for("model.layers.0.k_proj") == 16 / 8
    assert cfg.scale_for("model.layers.1.v_proj") == 2 / 8 and cfg.scale_for("model.layers.0.v_proj") == 16 / 8
    assert cfg.scale_for("model.layers.0.k_proj", r=2) == 16 / 2  # the rank a file's tensors have
    rs = LoraConfig(r=16, alpha=32, use_rslora=True)
    assert math.isclose(rs.scale_for("model.layers.0.q_proj"), 32 / 4)
    from lorakit.models import tiny_llama

    m = tiny_llama()  # the layer uses the same rule
    add_adapter(m, cfg, "x")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        assert m.get_submodule(path).adapters["x"].scale == cfg.scale_for(path)
    assert cfg.scale_for("model.layers.1.self_attn.v_proj") == 16 / 8  # "layers.1.v_proj" is not its path's end
