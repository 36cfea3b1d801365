import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, add_adapter, load_adapter, read_adapter, save_adapter
from lorakit.models import tiny_llama


def _trained(dora=False, **kw):
    m = tiny_llama()
    add_adapter(m, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False, use_dora=dora, **kw))
    return m


@pytest.mark.parametrize("dora", [False, True])
def test_save_load_roundtrip_bytes_and_logits(tmp_path, ids, dora):
    m = _trained(dora)
    out = m(ids).logits
    save_adapter(m, tmp_path / "ad", metadata={"note": "x"})
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_dora"] is dora
    assert not any(k.startswith("lorakit") for k in cfg)
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    a = keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = keys["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)
    assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys) is dora
    m2 = tiny_llama()
    load_adapter(m2, tmp_path / "ad")
    assert torch.equal(m2(ids).logits, out)
    af = read_adapter(tmp_path / "ad")
    assert af.metadata == {"note": "x"} and af.fingerprint["architecture"] == "LlamaForCausalLM"
    # bytes round-trip: save again, same tensors
    save_adapter(m2, tmp_path / "ad2")
    k2 = load_file(tmp_path / "ad2" / "adapter_model.safetensors")
    assert keys.keys() == k2.keys() and all(torch.equal(keys[k], k2[k]) for k in keys)


def test_incompatible_base_names_module_and_shapes(tmp_path):
    m = tiny_llama()
    add_adapter(m, LoraConfig(r=4, targets=["q_proj"]))
    save_adapter(m, tmp_path / "ad")
    other = tiny_llama(hidden=32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(64, 64\).*\(32, 32\)"):
        load_adapter(other, tmp_path / "ad")
    assert not any("lora" in n for n, _ in other.named_parameters())


def test_missing_and_corrupt_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_adapter(tiny, tmp_path / "nope")
    m = _trained()
    save_adapter(m, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(tiny, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(tiny, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny, tmp_path / "ad")


def test_atomic_save_leaves_no_partial_dir(tmp_path, monkeypatch):
    m = _trained()
    import lorakit.adapters.peft_files as A

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(A, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_adapter(m, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == []
