"""Composition: cat/linear exact (= stacking the adapters with weights), svd optimal with its error reported,
ties/dare by their definitions, conv/embedding modules, PEFT loads the result, bad input named."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lorakit import LoraConfig, add_adapter, load_adapter, read_adapter, save_adapter, set_active
from lorakit.adapters.compose import Factor, _dare, _ties, compose, parse_spec
from lorakit.models import tiny_llama

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def two(tmp_path):
    """a: r=4 on q,v; b: rsLoRA r=6 (o_proj r=2, alpha 3) on v,o,down: different ranks, scales and targets."""
    m = tiny_llama()
    torch.manual_seed(1)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False), "a")
    add_adapter(m, LoraConfig(r=6, alpha=3, targets=["v_proj", "o_proj", "down_proj"], use_rslora=True,
                              init_lora_weights=False, rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3}), "b")
    save_adapter(m, tmp_path / "a", "a")
    save_adapter(m, tmp_path / "b", "b")
    return tmp_path / "a", tmp_path / "b"


def _stacked_logits(paths_weights, ids):
    m = tiny_llama()
    for i, (p, _) in enumerate(paths_weights):
        load_adapter(m, p, f"x{i}")
    set_active(m, {f"x{i}": w for i, (_, w) in enumerate(paths_weights)})
    return m(ids).logits


def _composed_logits(path, ids):
    m = tiny_llama()
    load_adapter(m, path)
    return m(ids).logits


def test_cat_with_weights_equals_stacking_and_loads_in_peft(tmp_path, two, ids):
    a, b = two
    spec = [(a, 0.7), (b, -0.3)]
    res = compose(spec, "cat")
    res.save(tmp_path / "cat")
    want = _stacked_logits(spec, ids)
    assert (_composed_logits(tmp_path / "cat", ids) - want).abs().max() <= 1e-5
    af = read_adapter(tmp_path / "cat")
    ranks = {p: t["lora_A"].shape[0] for p, t in af.modules().items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == 10 and ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.self_attn.o_proj"] == 2
    assert af.config.alpha == af.config.r and not af.config.use_rslora  # one alpha; scales folded into B
    assert res.report["rel_error_overall"] == 0.0 and af.metadata["composed"]["method"] == "cat"
    assert af.fingerprint["architecture"] == "LlamaForCausalLM"
    # linear is the same exact sum: the same file
    lin = compose(spec, "linear")
    assert lin.tensors.keys() == res.tensors.keys() and all(torch.equal(lin.tensors[k], res.tensors[k])
                                                            for k in res.tensors)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "cat")
    assert (pm(ids).logits - want).abs().max() <= 1e-5


def _dense_delta(weights_paths, module):
    total = 0
    for p, w in weights_paths:
        af = read_adapter(p)
        t = af.modules().get(module)
        if t is None:
            continue
        cfg = af.config
        r = t["lora_A"].shape[0]
        alpha = 3 if module.endswith("o_proj") and cfg.use_rslora else cfg.alpha
        s = alpha / (r ** 0.5 if cfg.use_rslora else r)
        total = total + w * s * t["lora_B"] @ t["lora_A"]
    return total


def test_svd_is_the_best_rank_k_and_reports_its_error(tmp_path, two, ids):
    a, b = two
    spec = [(a, 0.7), (b, 0.3)]
    full = compose(spec, "svd", rank=10)  # rank >= every summed rank: exact
    assert full.report["rel_error_overall"] < 1e-6
    full.save(tmp_path / "full")
    assert (_composed_logits(tmp_path / "full", ids) - _stacked_logits(spec, ids)).abs().max() <= 1e-5
    res = compose(spec, "svd", rank=3)
    res.save(tmp_path / "r3")
    af = read_adapter(tmp_path / "r3")
    mod = "model.layers.1.self_attn.v_proj"
    D = _dense_delta(spec, mod)
    t = af.modules()[mod]
    approx = t["lora_B"] @ t["lora_A"]  # alpha = r: scale 1
    got = ((D - approx).norm() / D.norm()).item()
    S = torch.linalg.svdvals(D)
    best = (S[3:].square().sum().sqrt() / S.square().sum().sqrt()).item()  # Eckart-Young
    assert abs(got - best) < 1e-5 and abs(res.report["rel_error"][mod] - best) < 1e-5 and best > 0.05
    assert 0 < res.report["rel_error_overall"] <= res.report["rel_error_max"]


def _f(d):
    """A Factor holding a given dense change (rank = full)."""
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return Factor(U * S, Vh, False, tuple(Vh.shape))


def test_ties_trim_elect_disjoint_mean():
    d1 = torch.tensor([[4.0, -1.0, 0.5], [2.0, 3.0, -6.0]])
    d2 = torch.tensor([[-1.0, -2.0, 5.0], [-8.0, 0.1, 0.2]])
    B, A, err, _ = _ties([_f(d1), _f(d2)], rank=2, density=0.5)
    # keep top 3 of 6 by magnitude: d1 -> 4, 3, -6; d2 -> -2, 5, -8
    # elected signs (sum of kept): [4, -2, 5 | -8, 3, -6] -> +, -, + | -, +, -
    want = torch.tensor([[4.0, -2.0, 5.0], [-8.0, 3.0, -6.0]])  # no entry kept twice with agreeing signs
    assert err < 1e-6 and torch.allclose(B @ A, want, atol=1e-5)
    B, A, _, _ = _ties([_f(d1), _f(d1 * 3)], rank=2, density=1.0)
    assert torch.allclose(B @ A, d1 * 2, atol=1e-5)  # agreeing entries are averaged


def test_dare_drop_rescale_seeded():
    d = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    B, A, _, _ = _dare([_f(d), _f(-d)], rank=5, density=1.0, generator=torch.Generator().manual_seed(0))
    assert (B @ A).abs().max() < 1e-5  # density 1: the plain sum
    out = [_dare([_f(d)], rank=5, density=0.5, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    m = [b @ a for b, a, _, _ in out]
    assert torch.allclose(m[0], m[1]) and not torch.allclose(m[0], m[2])
    kept = m[0].abs() > 1e-4
    assert torch.allclose(m[0][kept], 2 * d[kept], atol=1e-4)  # survivors rescaled by 1/density
    assert 0.2 < kept.float().mean() < 0.8


def test_ties_and_dare_files_load_and_report(tmp_path, two, ids):
    a, b = two
    for method in ("ties", "dare"):
        res = compose([(a, 1.0), (b, 1.0)], method, rank=4, density=0.7, seed=3)
        res.save(tmp_path / method)
        af = read_adapter(tmp_path / method)
        assert max(t["lora_A"].shape[0] for t in af.modules().values()) == 4
        rep = af.metadata["composed"]
        assert rep["density"] == 0.7 and rep["target_rank"] == 4 and 0 < rep["rel_error_overall"] < 1
        base = tiny_llama()(ids).logits
        assert (_composed_logits(tmp_path / method, ids) - base).abs().max() > 1e-3  # it does something


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.proj = nn.Linear(4, 5)

    def forward(self, ids):
        h = self.conv(self.emb(ids).view(ids.shape[0], 2, -1, 4))  # (b, 3, s, 4)
        return self.proj(h)


def test_conv_and_embedding_modules_compose_exactly(tmp_path):
    m = Toy()
    add_adapter(m, LoraConfig(r=3, alpha=6, targets=["emb", "conv", "proj"], init_lora_weights=False), "a")
    add_adapter(m, LoraConfig(r=2, alpha=2, targets=["emb", "conv"], init_lora_weights=False), "b")
    save_adapter(m, tmp_path / "a", "a")
    save_adapter(m, tmp_path / "b", "b")
    ids = torch.randint(0, 20, (2, 4))
    set_active(m, {"a": 0.5, "b": 2.0})
    want = m(ids)
    compose([(tmp_path / "a", 0.5), (tmp_path / "b", 2.0)], "cat").save(tmp_path / "c")
    c = Toy()
    af = load_adapter(c, tmp_path / "c")
    assert af.tensors["base_model.model.conv.lora_A.weight"].shape == (5, 2, 3, 3)
    assert af.tensors["base_model.model.emb.lora_embedding_B"].shape == (8, 5)
    assert (c(ids) - want).abs().max() <= 1e-5


def test_bad_input_is_named(tmp_path, two):
    a, b = two
    with pytest.raises(ValueError, match=r"weight 'x' for adapter '.*a' is not a number"):
        parse_spec(f"{a}:x")
    assert parse_spec("dir/with:colon:0.25") == ("dir/with:colon", 0.25) and parse_spec("plain") == ("plain", 1.0)
    for bad in ("0.5", None, float("nan"), True):
        with pytest.raises(ValueError, match="must be a finite number"):
            compose([(a, 1.0), (b, bad)])
    with pytest.raises(ValueError, match="unknown compose method 'mean'"):
        compose([(a, 1.0)], "mean")
    with pytest.raises(ValueError, match="density"):
        compose([(a, 1.0)], "ties", density=0)
    other = tiny_llama(hidden=32)
    add_adapter(other, LoraConfig(r=4, targets=["q_proj"], init_lora_weights=False))
    save_adapter(other, tmp_path / "small")
    with pytest.raises(ValueError, match=r"different bases: module 'model\.layers\.0\.self_attn\.q_proj'"):
        compose([(a, 1.0), (tmp_path / "small", 1.0)])
    retrained = tiny_llama(seed=7)  # same shapes, other weights
    add_adapter(retrained, LoraConfig(r=4, targets=["q_proj"], init_lora_weights=False))
    save_adapter(retrained, tmp_path / "other_weights")
    with pytest.raises(ValueError, match="same shape but different weights"):
        compose([(a, 1.0), (tmp_path / "other_weights", 1.0)])
    assert compose([(a, 1.0), (tmp_path / "other_weights", 1.0)], allow_base_mismatch=True).report["modules"] == 4
    dora = tiny_llama()
    add_adapter(dora, LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    save_adapter(dora, tmp_path / "dora")
    with pytest.raises(ValueError, match="uses DoRA"):
        compose([(a, 1.0), (tmp_path / "dora", 1.0)])
    with pytest.raises(FileNotFoundError, match="nope"):
        compose([(tmp_path / "nope", 1.0)])


@pytest.mark.slow
def test_cli(tmp_path, two):
    a, b = two
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "lorakit", "compose", "--adapter", f"{a}:0.7", "--adapter", f"{b}:0.3",
                          "--method", "svd", "--rank", "3", "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "relative Frobenius error: overall" in run.stdout
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3
    bad = subprocess.run([sys.executable, "-m", "lorakit", "compose", "--adapter", f"{a}:heavy", "-o",
                          str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "weight 'heavy'" in bad.stderr and not (tmp_path / "x").exists()


def test_lorakit_plus_peft_on_one_base_named_two_ways(tmp_path, ids):
    """A lorakit adapter naming its base 'SmolLM2-135M-Instruct' and a PEFT adapter naming a cache path compose
    (shapes agree); the result equals the two stacked. Different weights under fingerprints name the CLI flag."""
    peft = pytest.importorskip("peft")
    from lorakit.adapters.compose import base_key

    m = tiny_llama()
    torch.manual_seed(2)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(m, tmp_path / "ours", base_name="SmolLM2-135M-Instruct")
    base = tiny_llama()
    base.name_or_path = "/root/.cache/huggingface/hub/models--org--Other-Name/snapshots/abc"  # PEFT records it
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("snapshots/abc")  # named differently, as in the issue
    assert read_adapter(tmp_path / "theirs").fingerprint is None
    c = compose([(tmp_path / "ours", 0.5), (tmp_path / "theirs", 1.0)], "cat")
    c.save(tmp_path / "mix")
    want = _stacked_logits([(tmp_path / "ours", 0.5), (tmp_path / "theirs", 1.0)], ids)
    assert (_composed_logits(tmp_path / "mix", ids) - want).abs().max() <= 1e-5

    # two PEFT files: no fingerprints, so names decide (reduced to the model's own name)
    assert base_key("/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/1a2b") \
        == base_key("HuggingFaceTB/SmolLM2-135M-Instruct") == base_key("/x/SmolLM2-135M-Instruct/") \
        == "smollm2-135m-instruct"
    cfg["base_model_name_or_path"] = "org/another-model"
    import shutil
    shutil.copytree(tmp_path / "theirs", tmp_path / "theirs2")
    (tmp_path / "theirs2" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="name different bases.*--allow-base-mismatch"):
        compose([(tmp_path / "theirs", 1.0), (tmp_path / "theirs2", 1.0)])
    assert compose([(tmp_path / "theirs", 1.0), (tmp_path / "theirs2", 1.0)], allow_base_mismatch=True)

    retrained = tiny_llama(seed=7)
    add_adapter(retrained, LoraConfig(r=4, targets=["q_proj"], init_lora_weights=False))
    save_adapter(retrained, tmp_path / "other_weights", base_name="SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match=r"different weights.*pass --allow-base-mismatch") as e:
        compose([(tmp_path / "ours", 1.0), (tmp_path / "other_weights", 1.0)])
    assert "allow_base_mismatch" not in str(e.value)
