"""Adapters move both ways between lorakit and HF PEFT 0.21 with the same logits (fp32, <= 1e-5)."""
import pytest
import torch

peft = pytest.importorskip("peft")

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter  # noqa: E402
from lorakit.models import tiny_llama  # noqa: E402


@pytest.mark.parametrize("dora,rslora,targets", [(False, False, ["q_proj", "v_proj"]), (False, True, "all-linear"),
                                                 (True, False, ["q_proj", "down_proj"])])
def test_lorakit_adapter_loads_in_peft(tmp_path, ids, dora, rslora, targets):
    m = tiny_llama()
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=targets, init_lora_weights=False, use_dora=dora,
                              use_rslora=rslora, rank_pattern={"o_proj": 2}))
    want = m(ids).logits
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    got = pm(ids).logits
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_lorakit(tmp_path, ids, dora):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj", "o_proj"], use_dora=dora,
                          init_lora_weights=False, rank_pattern={"up_proj": 4}, alpha_pattern={"o_proj": 4})
    pm = peft.get_peft_model(tiny_llama(), cfg)
    want = pm(ids).logits
    pm.save_pretrained(tmp_path / "peft_ad")
    m = tiny_llama()
    load_adapter(m, tmp_path / "peft_ad")
    assert (m(ids).logits - want).abs().max() <= 1e-5


def test_adapter_with_dropout_follows_the_models_eval_mode(tmp_path, ids):
    """An adapter added or loaded on a model in eval mode is in eval mode too: dropout 0.1 is off, two forward
    passes are equal, and the logits equal PEFT's for the same file (PEFT loads adapters in eval mode)."""
    m = tiny_llama()  # eval mode
    torch.manual_seed(0)
    add_adapter(m, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear", init_lora_weights=False))
    a, b = m(ids).logits, m(ids).logits
    assert torch.equal(a, b)
    save_adapter(m, tmp_path / "ad")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ad")
    got = fresh(ids).logits
    assert torch.equal(got, fresh(ids).logits) and (got - a).abs().max() <= 1e-6
    want = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")(ids).logits
    assert (got - want).abs().max() <= 1e-5
    m.train()  # and training mode turns dropout on again
    assert not torch.equal(m(ids).logits, m(ids).logits)
