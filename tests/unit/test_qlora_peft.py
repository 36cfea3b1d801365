"""QLoRA adapters move between PEFT on a bitsandbytes 4-bit base and lorakit on its NF4 base (issue 24), on the
CPU with the real bitsandbytes (its CPU kernels) and PEFT's bitsandbytes LoRA layer: PEFT's adapter loads in
lorakit, lorakit's loads in PEFT, and each gives the other's logits."""
import pytest
import torch

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter
from lorakit.core.nf4 import LoraNF4Linear, from_bitsandbytes, quantize_model
from lorakit.models import tiny_llama

NO_BNB = "bitsandbytes is optional (the test extra installs it; its CPU build runs this test)"

bnb = pytest.importorskip("bitsandbytes", reason=NO_BNB)
peft = pytest.importorskip("peft")


def bnb_base(seed: int = 0):
    """tiny_llama with every decoder linear as bitsandbytes Linear4bit (NF4, double quantization), as
    transformers' BitsAndBytesConfig loads it (bench/gpu_train.py's bnb_quantize, on the CPU)."""
    m = tiny_llama(seed)
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                    setattr(parent, name, q.to("cpu"))  # quantized here, by bitsandbytes
    m.is_loaded_in_4bit = True
    return m


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_peft_qlora_adapter_loads_in_lorakit_with_the_same_logits(tmp_path, ids):
    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(bnb_base(), PeftConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's QLoRA layer
    pm.save_pretrained(tmp_path / "peft")
    pm.train()  # bitsandbytes' exact CPU path (see the next test)
    want = _logits(pm, ids)

    ours = bnb_base()
    assert from_bitsandbytes(ours)["modules"] == 14  # the same 4-bit state, shared
    base = _logits(ours, ids)
    load_adapter(ours, tmp_path / "peft")
    assert isinstance(ours.model.layers[1].mlp.down_proj, LoraNF4Linear)
    got = _logits(ours, ids)
    assert (got - base).abs().max() > 100 * (got - want).abs().max()  # the adapter changes the output ...
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # ... as it does in PEFT (fp32, summation order)


def test_lorakit_qlora_adapter_loads_in_peft_on_bitsandbytes_with_the_same_logits(tmp_path, ids):
    from peft import PeftModel

    torch.manual_seed(1)
    ours = tiny_llama()
    quantize_model(ours)  # lorakit's own quantization: the 4-bit codes equal bitsandbytes' (test_quant.py)
    add_adapter(ours, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    save_adapter(ours, tmp_path / "ours")
    pm = PeftModel.from_pretrained(bnb_base(), tmp_path / "ours")
    # in eval mode on a CPU with AVX512-BF16, bitsandbytes repacks each weight for its own bf16 CPU kernel (about
    # 2e-3 off the float32 product); in train mode (dropout is 0: the same function) it dequantizes and multiplies
    pm.train()
    assert type(pm.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    want = _logits(pm, ids)

    shared = bnb_base()  # the comparison at equal bases: lorakit on bitsandbytes' state
    from_bitsandbytes(shared)
    load_adapter(shared, tmp_path / "ours")
    assert (_logits(shared, ids) - want).abs().max() <= 1e-5 * want.abs().max()
    # on lorakit's own quantization the bases differ only where bitsandbytes' CPU kernel rounded an 8-bit absmax
    # to a neighbouring code (<0.8% of that block's scale): far below the adapter's effect
    gap = (_logits(ours, ids) - want).abs().max()
    effect = (want - _logits(bnb_base(), ids)).abs().max()
    assert gap < 0.05 * effect
