"""lorakit estimate: parameter counts equal the real model's, the activation model equals what autograd saves,
and the predicted peak memory is within 25% of a real training step's measured peak (CPU, subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.config import LoraConfig
from lorakit.lab.estimate import NF4_BYTES, activation_bytes, arch_of, estimate, lora_params, measure
from lorakit.core.inject import add_adapter, count_params
from lorakit.train.backends import causal_lm_loss

ROOT = Path(__file__).resolve().parents[2]
MID = dict(model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def small_llama(dtype=torch.float32):
    cfg = AutoConfig.for_model(model_type="llama", vocab_size=500, hidden_size=96, intermediate_size=256,
                               num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


@pytest.mark.parametrize("targets", ["all-linear", "attn", ["q_proj", "v_proj"]])
def test_lora_params_equal_the_adapted_model(targets):
    model = small_llama()
    arch = arch_of(model.config)
    assert arch.params == count_params(model)[1]  # tied embedding counted once
    add_adapter(model, LoraConfig(r=4, targets=targets))
    assert lora_params(arch, 4, targets) == count_params(model)[0]
    assert estimate(arch, "lora", r=4, targets=targets).trainable == count_params(model)[0]
    assert estimate(arch, "full").trainable == arch.params


def _saved_activation_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one forward + loss, parameters and the scalar loss excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() > 1:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,targets", [("full", "all-linear"), ("lora", "all-linear"), ("lora", "attn"),
                                            ("lora", ["v_proj", "down_proj"])])
def test_activation_model_counts_what_autograd_saves(method, targets, dtype):
    model = small_llama(dtype)
    arch = arch_of(model.config)
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        add_adapter(model, LoraConfig(r=4, targets=targets))
    b, s = 2, 24
    ids = torch.randint(0, 500, (b, s), generator=torch.Generator().manual_seed(0))
    measured = _saved_activation_bytes(model, ids)
    # the model's own terms, plus what lorakit's loss keeps: the fp32 log-softmax of the shifted logits
    act = 4 if dtype == torch.float32 else 2
    predicted = activation_bytes(arch, method, 4, targets, False, act) * b * s + b * (s - 1) * 500 * 4
    # measured also holds the rotary cos/sin tables (2 * s * head_dim, shared by all layers) and the labels
    assert abs(measured - predicted) <= (2 * s * 16) * act + b * s * 8 + 0.002 * predicted, (measured, predicted)


def test_qlora_and_checkpointing_shrink_memory_by_the_stated_rules():
    arch = arch_of(small_llama().config)
    lora = estimate(arch, "lora", r=8, batch=4, seq=256)
    q = estimate(arch, "qlora", r=8, batch=4, seq=256)
    quant = sum(i * o for p, (i, o) in arch.linear.items() if p != arch.head)
    assert q.weights == int(quant * NF4_BYTES) + (arch.params - quant) * 2 + q.trainable * 2  # bf16 rest
    assert q.trainable == lora.trainable and q.optimizer == 2 * 2 * q.trainable  # AdamW: 2 bf16 states
    assert lora.optimizer == 2 * 4 * lora.trainable and lora.weights == (arch.params + lora.trainable) * 4
    ck = estimate(arch, "lora", r=8, batch=4, seq=256, checkpointing=True)
    assert ck.activations < lora.activations / 2
    full = estimate(arch, "full", batch=4, seq=256)
    assert full.grads == 4 * arch.params and full.optimizer == 8 * arch.params
    with pytest.raises(ValueError, match="method 'adam'"):
        estimate(arch, "adam")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        estimate(arch, "lora", batch=0)


@pytest.mark.slow
@pytest.mark.parametrize("method,targets", [("lora", "all-linear"), ("full", "all-linear")])
def test_prediction_within_25_percent_of_measured_peak(method, targets):
    """A real 2-step training run of a 7M-parameter Llama (batch 8 x 128 tokens) in a subprocess; peak RSS."""
    arch = arch_of(AutoConfig.for_model(**MID))
    pred = estimate(arch, method, r=16, batch=8, seq=128, targets=targets).total / 2 ** 20
    got = measure(MID, method, r=16, batch=8, seq=128, targets=targets)
    assert got["trainable"] == estimate(arch, method, r=16, targets=targets).trainable
    assert abs(got["measured_mib"] / pred - 1) < 0.25, (got, pred)


@pytest.mark.slow
def test_estimate_cli(tiny_dir, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "lorakit", "estimate", "--model", str(tiny_dir), "--r", "8",
                        "--batch", "2", "--seq", "64", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    by = {e["method"]: e for e in out["estimates"]}
    # tiny_llama: 2 layers of q,k,v,o (64x64, 64x32, 64x32, 64x64) and gate,up,down (64x128 x3)
    assert by["lora"]["trainable"] == 2 * 8 * (128 + 96 + 96 + 128 + 192 * 3)
    assert by["full"]["optimizer"] == 2 * by["full"]["grads"] > 0
    assert by["qlora"]["total"] < by["lora"]["total"] < by["full"]["total"]

    from lorakit.cli.main import main

    assert main(["estimate", "--model", str(tiny_dir), "--r", "0"]) == 2
    assert "r must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tiny_dir), "--targets", "nope"]) == 2
    assert "unknown target module 'nope'" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tiny_dir), "--r", "4", "--targets", "q_proj+v_proj"]) == 0
    text = capsys.readouterr().out
    assert f"{2 * 4 * (128 + 96):,}" in text and "qlora" in text


def test_fsdp_estimate_shards_weights_grads_and_state_and_adds_two_whole_units():
    """--shards S: weights, gradients and AdamW state are 1/S of one process's; two units gathered whole; the
    decoder-layer unit of a QLoRA model is the bytes a real 4-bit layer with its adapters holds (bf16 norms and
    adapters), up to the quantizer's per-weight rounding."""
    from lorakit.core.nf4 import quantize_model, weight_bytes
    from lorakit.lab.estimate import unit_bytes

    model = small_llama(torch.bfloat16)
    arch = arch_of(model.config)
    for method in ("lora", "qlora", "full"):
        one = estimate(arch, method, 16, 2, 64, "all-linear", "bfloat16", True)
        two = estimate(arch, method, 16, 2, 64, "all-linear", "bfloat16", True, shards=2)
        assert (two.weights, two.grads, two.optimizer) == tuple(-(-x // 2) for x in (one.weights, one.grads,
                                                                                    one.optimizer))
        assert (two.activations, two.logits) == (one.activations, one.logits) and one.gathered == 0
        assert two.gathered == 2 * max(unit_bytes(arch, method, 16, "all-linear", 2))
    quantize_model(model, "all-linear")
    add_adapter(model, LoraConfig(r=16, targets="all-linear"))
    layer = model.model.layers[0].to(torch.bfloat16)
    real = weight_bytes(layer)["total_bytes"]
    predicted = unit_bytes(arch, "qlora", 16, "all-linear", 2)[0]
    assert abs(real - predicted) <= 8 * 7, (real, predicted)  # 7 linears: ceil()s and the fp32 mean
