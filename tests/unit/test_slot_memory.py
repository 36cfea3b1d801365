"""Slot memory is bounded and given back: each layer's bank holds the largest rank resident on that layer (one
high-rank adapter on one layer grows that layer alone), an adapter above --max-lora-rank is refused with the
number, and unloading shrinks every layer back (a layer no adapter uses is dropped) while the adapters still
resident give exactly the outputs they gave before."""
import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import fingerprint, read_adapter
from lorakit.models import tiny_llama
from lorakit.serve.slots import SlotBank

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def files(tmp_path):
    src = tiny_llama()
    cfgs = {"small": LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False),
            "wide": LoraConfig(r=32, alpha=32, targets=[Q0], init_lora_weights=False),  # rank 32 on one layer
            "huge": LoraConfig(r=80, alpha=80, targets=["v_proj"], init_lora_weights=False)}
    for name, cfg in cfgs.items():
        add_adapter(src, cfg, name)
        save_adapter(src, tmp_path / name, name)
    return src, tmp_path


def _logits(model, bank, slot, ids):
    bank.set_batch(torch.tensor([[slot]]), torch.tensor([[1.0]]))
    return model(ids).logits


def test_one_high_rank_adapter_grows_its_own_layer_and_memory_comes_back(files):
    src, d = files
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    set_active(src, "small")
    want = src(ids).logits
    model = tiny_llama()
    bank = SlotBank(model, max_slots=2, base_fp=fingerprint(model), max_rank=64)
    s = bank.acquire("small", lambda: read_adapter(d / "small"))
    alone = bank.nbytes()
    ranks = {p: ls.A.shape[1] for p, ls in bank.layers.items()}
    assert set(ranks.values()) == {4}
    w = bank.acquire("wide", lambda: read_adapter(d / "wide"))
    assert bank.layers[Q0].A.shape[1] == 32
    assert all(ls.A.shape[1] == 4 for p, ls in bank.layers.items() if p != Q0)  # no other layer grew
    in_f, out_f = bank.layers[Q0].A.shape[2], bank.layers[Q0].B.shape[1]
    elt = bank.layers[Q0].A.element_size()
    assert bank.nbytes() - alone == 3 * (32 - 4) * (in_f + out_f) * elt  # S = 3 slots, one layer, 28 more ranks
    torch.testing.assert_close(_logits(model, bank, s, ids), want, rtol=1e-4, atol=1e-5)
    bank.release(w)
    assert bank.unload("wide")
    assert bank.nbytes() == alone and bank.layers[Q0].A.shape[1] == 4  # given back
    torch.testing.assert_close(_logits(model, bank, s, ids), want, rtol=1e-4, atol=1e-5)
    bank.release(s)
    assert bank.unload("small") and bank.nbytes() == 0 and not bank.layers
    set_active(src, None)
    bank.set_batch(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1))
    torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=1e-6)


def test_an_adapter_above_the_maximum_rank_is_refused_with_the_number(files):
    _, d = files
    model = tiny_llama()
    bank = SlotBank(model, max_slots=2, base_fp=fingerprint(model), max_rank=64)
    with pytest.raises(ValueError, match=r"rank 80 .*at most 64 \(--max-lora-rank\)"):
        bank.acquire("huge", lambda: read_adapter(d / "huge"))
    assert not bank.resident and not bank.layers and bank.nbytes() == 0


def test_eviction_shrinks_the_banks_to_what_stays(files):
    _, d = files
    model = tiny_llama()
    bank = SlotBank(model, max_slots=1, base_fp=fingerprint(model), max_rank=64)
    bank.release(bank.acquire("wide", lambda: read_adapter(d / "wide")))
    bank.release(bank.acquire("small", lambda: read_adapter(d / "small")))  # evicts wide
    assert list(bank.resident) == ["small"] and bank.layers[Q0].A.shape[1] == 4


def test_a_reused_slot_holds_exactly_its_new_adapter(tmp_path):
    """One slot reused by adapters on different layers (one with a per-layer alpha, one DoRA): after each
    eviction the slot is non-zero on exactly the new adapter's layers (zeroing only what the last one wrote leaves
    nothing behind), and the rows of both slots give their adapters' offline logits."""
    src = tiny_llama()
    cfgs = {"keep": LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False),
            "qv": LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2.0},
                             init_lora_weights=False),
            "dora": LoraConfig(r=2, alpha=4, targets=["down_proj", "q_proj"], use_dora=True,
                               init_lora_weights=False),
            "wide": LoraConfig(r=32, alpha=32, targets=[Q0], init_lora_weights=False)}
    for name, cfg in cfgs.items():
        add_adapter(src, cfg, name)
        save_adapter(src, tmp_path / name, name)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    bank = SlotBank(model, max_slots=2, base_fp=fingerprint(model), max_rank=64)
    keep = bank.acquire("keep", lambda: read_adapter(tmp_path / "keep"))  # pinned: the other slot is reused
    for name in ("wide", "qv", "dora", "qv", "wide"):
        slot = bank.acquire(name, lambda: read_adapter(tmp_path / name))
        assert slot != keep and list(bank.resident) == ["keep", name]
        mine = set(read_adapter(tmp_path / name).modules())
        for path, ls in bank.layers.items():
            written = bool(ls.A[slot].any()) or bool(ls.B[slot].any()) or (ls.dora is not None and
                                                                             bool(ls.dora[slot].any()))
            assert written == (path in mine), (name, path)
        for s, adapter in ((slot, name), (keep, "keep")):
            set_active(src, adapter)
            torch.testing.assert_close(_logits(model, bank, s, ids), src(ids).logits, rtol=1e-4, atol=1e-5)
        bank.release(slot)


def test_grouped_projections_give_each_members_own_output(files):
    """SlotBank.project_group (the decoder's q/k/v and gate/up path) equals `project` member by member for a decode
    batch whose rows run different adapters, with a member that only one adapter adapts (q_proj at rank 32 beside
    rank 4) and one that no adapter adapts (k_proj here): exactly, on the CPU."""
    src, d = files
    model = tiny_llama()
    bank = SlotBank(model, max_slots=3, base_fp=fingerprint(model), max_rank=64)
    small = bank.acquire("small", lambda: read_adapter(d / "small"))
    wide = bank.acquire("wide", lambda: read_adapter(d / "wide"))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    del bank.layers["model.layers.0.self_attn.k_proj"], bank._by_module[attn.k_proj]  # k_proj: no slots
    bank.set_batch(torch.tensor([[small], [wide], [0], [small]]), torch.tensor([[1.0], [0.5], [1.0], [2.0]]))
    x = torch.randn(4, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for mods in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        got = bank.project_group(mods, x)
        want = [bank.project(m, x) for m in mods]
        base = [m.base_forward(x) for m in mods]
        for g, w, b in zip(got, want, base):
            assert torch.equal(g, w)
        assert all(not torch.equal(w, b) for w, b, m in zip(want, base, mods) if m is not attn.k_proj)


def test_the_grouped_op_compiles_and_adds_what_each_member_adds():
    """lorakit::lora_add_group (the custom op the decoder's grouped path calls on CUDA, opaque to torch.compile)
    through torch.compile(dynamic=True) on the CPU: each member's output gets exactly what lora_add per member adds,
    for two and three members, stacks of two, a slot of -1, and a second batch size (no recompile needed)."""
    from lorakit import kernels

    g = torch.Generator().manual_seed(3)
    d, outs, r, S = 16, (24, 8, 40), 4, 4
    Ws = [torch.randn(n, d, generator=g) for n in outs]
    As = [torch.randn(S, r, d, generator=g) for _ in outs]
    Bs = [torch.randn(S, n, r, generator=g) for n in outs]

    def step(x, idx, coef, m):
        ys = [x @ W.T for W in Ws[:m]]
        third = (As[2], Bs[2], ys[2]) if m == 3 else (None, None, None)
        torch.ops.lorakit.lora_add_group(x, idx, coef, As[0], Bs[0], ys[0], As[1], Bs[1], ys[1], *third)
        return [torch.relu(y) * 2 for y in ys]

    compiled = torch.compile(step, dynamic=True)
    for T in (6, 3):
        x = torch.randn(T, 1, d, generator=g)
        idx = torch.randint(-1, S, (T, 2), generator=g)
        coef = torch.rand(T, 2, generator=g)
        for m in (2, 3):
            want = []
            for W, A, B in zip(Ws[:m], As, Bs):
                y = x @ W.T
                kernels.lora_add(y, x, A, B, idx, coef)
                want.append(torch.relu(y) * 2)
            got = compiled(x, idx, coef, m)
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())) for a, b in zip(got, want))
            assert any(not torch.equal(w, torch.relu(x @ W.T) * 2) for w, W in zip(want, Ws))  # adapters add something
