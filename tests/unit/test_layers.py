"""LoRA on Conv1d / Conv2d / Embedding: PEFT 0.21 layout both ways (<= 1e-5), merge/unmerge exact."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lorakit import LoraConfig, add_adapter, load_adapter, merge, save_adapter, unload, unmerge
from lorakit.core.conv_embedding import LoraConv, LoraEmbedding
from lorakit.core.inject import find_targets, lora_layers

peft = pytest.importorskip("peft")

TARGETS = ["emb", "conv1", "conv2", "proj"]


class Toy(nn.Module):
    """Embedding -> Conv1d -> Conv2d (3x3, stride 2, as in a U-Net down block) -> Linear."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.conv1 = nn.Conv1d(16, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.proj = nn.Linear(5, 6)

    def prepare_inputs_for_generation(self, *a, **k):  # PEFT's causal-LM wrapper looks this up
        raise NotImplementedError

    def forward(self, input_ids, **kw):
        h = self.conv1(self.emb(input_ids).transpose(1, 2))  # (b, 12, s)
        img = self.conv2(h.reshape(h.shape[0], 3, 4, -1))  # (b, 5, 2, s/2)
        return self.proj(img.permute(0, 2, 3, 1))  # (b, 2, s/2, 6)


@pytest.fixture
def toks():
    return torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_is_identity_and_keys_are_peft(tmp_path, toks):
    m = Toy()
    ref = m(toks)
    paths = add_adapter(m, LoraConfig(r=4, alpha=8, targets=TARGETS))
    assert paths == TARGETS
    assert isinstance(m.emb, LoraEmbedding) and isinstance(m.conv2, LoraConv)
    assert (m(toks) - ref).abs().max() < 1e-6  # conv B = 0, embedding A = 0 (layouts may differ: not bitwise)
    save_adapter(m, tmp_path / "ad")
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in t.items()}
    assert shapes == {"emb.lora_embedding_A": (4, 50), "emb.lora_embedding_B": (16, 4),
                      "conv1.lora_A.weight": (4, 16, 3), "conv1.lora_B.weight": (12, 4, 1),
                      "conv2.lora_A.weight": (4, 3, 3, 3), "conv2.lora_B.weight": (5, 4, 1, 1),
                      "proj.lora_A.weight": (4, 5), "proj.lora_B.weight": (6, 4)}
    lora_names = {f"{p}.adapters.default.lora_{x}" for p in TARGETS for x in "AB"}
    assert set(m.state_dict()) == set(Toy().state_dict()) | lora_names  # base names unchanged


@pytest.mark.parametrize("rslora", [False, True])
def test_lorakit_conv_embedding_adapter_loads_in_peft(tmp_path, toks, rslora):
    m = Toy()
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=TARGETS, init_lora_weights=False, use_rslora=rslora,
                              rank_pattern={"conv2": 2}))
    want = m(toks)
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(Toy(), tmp_path / "ad")
    assert isinstance(pm.base_model.model.conv2, peft.tuners.lora.Conv2d)
    assert (pm.base_model.model(toks) - want).abs().max() <= 1e-5


def test_peft_conv_embedding_adapter_loads_in_lorakit(tmp_path, toks):
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, init_lora_weights=False,
                          rank_pattern={"conv1": 3}, alpha_pattern={"emb": 3})
    pm = peft.get_peft_model(Toy(), cfg)
    want = pm.base_model.model(toks)
    pm.save_pretrained(tmp_path / "peft_ad")
    m = Toy()
    load_adapter(m, tmp_path / "peft_ad")
    assert m.conv1.adapters["default"].r == 3 and m.emb.adapters["default"].scale == pytest.approx(3 / 6)
    assert (m(toks) - want).abs().max() <= 1e-5


def test_embedding_adapter_on_llama_both_ways(tmp_path, ids):
    from lorakit.models import tiny_llama

    m = tiny_llama()
    add_adapter(m, LoraConfig(r=4, alpha=4, targets=["embed_tokens", "q_proj"], init_lora_weights=False))
    want = m(ids).logits
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    assert (pm(ids).logits - want).abs().max() <= 1e-5
    m2 = tiny_llama()
    load_adapter(m2, tmp_path / "ad")
    assert torch.equal(m2(ids).logits, want)


def test_merge_unmerge_exact_and_unload(toks):
    m = Toy()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=TARGETS, init_lora_weights=False), "a")
    add_adapter(m, LoraConfig(r=2, alpha=2, targets=["conv2", "emb"], init_lora_weights=False), "b")
    from lorakit import set_active

    set_active(m, {"a": 0.7, "b": -1.3})
    out = m(toks)
    merge(m)
    assert (m(toks) - out).abs().max() < 1e-5
    assert (m.conv2.weight - base["conv2.weight"]).abs().max() > 1e-3  # really merged
    unmerge(m)
    for k in base:
        assert (m.state_dict()[k] - base[k]).abs().max() < 1e-6, k
    assert (m(toks) - out).abs().max() < 1e-5
    unload(m, merge_active=True)
    assert type(m.conv2) is nn.Conv2d and type(m.emb) is nn.Embedding and type(m.conv1) is nn.Conv1d
    assert m.emb.padding_idx == 0 and m.conv2.stride == (2, 2)
    assert sorted(m.state_dict()) == sorted(base)
    assert (m(toks) - out).abs().max() < 1e-5


def test_conv_and_embedding_adapters_train(toks):
    m = Toy()
    add_adapter(m, LoraConfig(r=4, targets=TARGETS))
    m(toks).square().mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert len(grads) == 8
    assert grads["conv2.adapters.default.lora_B"].abs().sum() > 0  # B = 0, A random: B learns first
    assert grads["emb.adapters.default.lora_A"].abs().sum() > 0  # A = 0, B random: A learns first
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_targets_and_bad_input(toks):
    m = Toy()
    assert find_targets(m, "all-linear") == ["proj"]  # conv and embedding only when named
    assert find_targets(m, r"conv\d") == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="DoRA on conv module 'conv1'"):
        add_adapter(m, LoraConfig(targets=["proj", "conv1"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA on embedding module 'emb'"):
        add_adapter(m, LoraConfig(targets=["emb"], use_dora=True))
    m.conv2 = nn.Conv2d(3, 6, 3, groups=3)
    with pytest.raises(ValueError, match="'conv2' has groups=3"):
        add_adapter(m, LoraConfig(targets=["conv2"]))
    m.conv2 = nn.Conv2d(3, 6, 3, dilation=2)
    with pytest.raises(ValueError, match=r"'conv2' has dilation=\(2, 2\)"):
        add_adapter(m, LoraConfig(targets=["conv2"]))
    assert not list(lora_layers(m))  # nothing half-applied


def test_tied_embedding_refuses_merge_but_runs_unmerged():
    m = Toy()
    m.head = nn.Linear(16, 50, bias=False)
    m.head.weight = m.emb.weight  # tied input/output embeddings
    add_adapter(m, LoraConfig(r=2, targets=["emb"], init_lora_weights=False))
    x = torch.tensor([[3, 4]])
    h = m.emb(x)
    want = h @ m.head.weight.T  # head stays the base embedding
    with pytest.raises(ValueError, match=r"shared with \['head'\]"):
        merge(m)
    assert torch.equal(m.head(h), want)
