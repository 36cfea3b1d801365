"""A QLoRA adapter merged into a bf16 copy of the base it was trained on (core/qlora_merge.py, lorakit merge and
lorakit export with --base-quant): the merged weight is exactly round_bf16(dequant_fp32(W4) + s * B @ A); the
merged model's logits are the 4-bit model + adapter's within what rounding the weights to bf16 moves them; the
GGUF of the merged model reads back with those bf16 weights bit for bit."""
import copy
import math

import pytest
import torch

gguf = pytest.importorskip("gguf")

from lorakit import LoraConfig, add_adapter, save_adapter  # noqa: E402
from lorakit.cli.main import main  # noqa: E402
from lorakit.core.inject import lora_layers, unload  # noqa: E402
from lorakit.core.nf4 import dequantize_nf4, quantize_model  # noqa: E402
from lorakit.core.qlora_merge import dequantize_fp32, merge_qlora  # noqa: E402
from lorakit.models import load_base, tiny_llama  # noqa: E402
from test_gguf_export import small_dir  # noqa: E402,F401  (the fixture: a tiny Llama dir with a tokenizer)

IDS = torch.tensor([[5, 60, 70, 100, 33, 1, 2, 120, 7, 9, 64, 3]])
U_BF16 = 2.0 ** -8  # bf16's unit round-off: rounding to nearest moves a value by at most this, relative


def qlora(seed: int = 0):
    """A tiny Llama (init 0.2: logits of order 1) with its linear layers in NF4 and a non-trivial adapter on
    each (B not zero, as after training), plus the reference pieces for every adapted layer."""
    model = tiny_llama(seed, init_std=0.2)
    quantize_model(model)
    torch.manual_seed(seed + 1)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    ref = {}
    for path, layer in lora_layers(model):
        p = layer.adapters["default"]
        w4 = dequantize_nf4(dict(layer.weight.named_buffers()), torch.Size(layer.weight.shape), torch.float32)
        ref[path] = (w4, (p.lora_B.detach().float() @ p.lora_A.detach().float()) * p.scale)  # (out, in) fp32
    return model, ref


def test_dequantized_once_computes_what_the_4bit_layers_compute():
    """dequantize_fp32 keeps the adapters, unmerged and active, on dense fp32 weights holding the values the 4-bit
    layers dequantize to at every call: the same logits up to fp32 summation order (a few ulp of their scale)."""
    model, ref = qlora()
    with torch.no_grad():
        want = model(IDS).logits
        assert dequantize_fp32(model) == len(ref)
        got = model(IDS).logits
    for path, (w4, _) in ref.items():
        assert torch.equal(model.get_submodule(path).weight, w4) and model.get_submodule(path).active == {"default": 1.0}
    assert (got - want).abs().max() <= 64 * torch.finfo(torch.float32).eps * want.abs().max()


def test_merged_weight_is_dequant_plus_delta_rounded_once():
    model, ref = qlora()
    merged = merge_qlora(model)
    assert not list(lora_layers(merged)) and all(p.dtype == torch.bfloat16 for p in merged.parameters())
    for path, (w4, delta) in ref.items():
        got = merged.get_submodule(path).weight
        assert torch.equal(got, (w4 + delta).to(torch.bfloat16)), path
        # and not two roundings: rounding the dequantized base to bf16 before adding gives other bits somewhere
        assert not torch.equal(got, (w4.to(torch.bfloat16).float() + delta).to(torch.bfloat16)), path


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_merged_logits_match_the_4bit_model_with_adapter():
    """Rounding a weight to bf16 moves it by at most u = 2^-8 (relative), on average u/sqrt(3) (uniform in the
    half-step); a layer's output moves by the same relative amount (independent errors add as a norm), and the
    logits, which pass through n rounded matrices on their way (q/k/v/o, gate/up/down per layer, the head), by
    about sqrt(n) u/sqrt(3). The bound allows 4x that. The merge into the full-precision base (the weights the
    adapter never saw) is far outside it: NF4's ~9% per-weight error is what the bound must tell apart."""
    model, _ = qlora()
    with torch.no_grad():
        want = model(IDS).logits  # the 4-bit base (fp32 compute) + the adapter, unmerged
        merged = merge_qlora(copy.deepcopy(model)).float()  # bf16 weights, exactly widened: only their rounding
        got = merged(IDS).logits
    n = 7 * model.config.num_hidden_layers + 1
    bound = 4 * math.sqrt(n) * U_BF16 / math.sqrt(3)
    gap = relative_gap(got, want)
    assert gap <= bound, (gap, bound)

    full = tiny_llama(0, init_std=0.2)  # the original weights with the same adapter, merged
    torch.manual_seed(1)
    add_adapter(full, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    with torch.no_grad():
        off = relative_gap(unload(full, merge_active=True)(IDS).logits, want)
    assert off > 4 * bound, (off, bound)


def test_cli_merge_and_gguf_export_round_trip(small_dir, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file

    from lorakit.adapters.gguf_export import model_tensors

    model, _ = load_base(str(small_dir), device="cpu", quant="nf4")
    torch.manual_seed(4)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "qa", metadata={"base_quant": "nf4"})  # what lorakit train --quantize records
    want = merge_qlora(copy.deepcopy(model))

    assert main(["merge", "--model", str(small_dir), "--adapter", str(tmp_path / "qa"), "-o",
                 str(tmp_path / "merged")]) == 0
    assert "dequantized nf4 base" in capsys.readouterr().out
    saved = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        saved.update(load_file(f))
    for k, t in want.state_dict().items():
        if "rotary" not in k:
            assert saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], t), k

    assert main(["export", "--model", str(small_dir), "--adapter", str(tmp_path / "qa"), "--outtype", "bf16",
                 "-o", str(tmp_path / "m.gguf")]) == 0
    read = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    expect = dict(model_tensors(want))
    assert set(read) == set(expect)
    for name, t in expect.items():
        r = read[name]
        vals = gguf.quants.dequantize(r.data, r.tensor_type).reshape(t.shape)  # bf16 (2-D) or f32 (norms)
        assert torch.equal(torch.from_numpy(vals.copy()), t.float()), name

    # --base-quant none: the same adapter merged into the full-precision base, a different model
    assert main(["merge", "--model", str(small_dir), "--adapter", str(tmp_path / "qa"), "--base-quant", "none",
                 "--save-dtype", "bfloat16", "-o", str(tmp_path / "full")]) == 0
    other = {}
    for f in (tmp_path / "full").glob("*.safetensors"):
        other.update(load_file(f))
    k = "model.layers.0.mlp.down_proj.weight"
    assert other[k].dtype == torch.bfloat16 and not torch.equal(other[k], saved[k])


def test_merge_qlora_refuses_a_full_precision_model():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="no 4-bit layer"):
        merge_qlora(model)
