"""Per-row multi-adapter LoRA: the reference gather kernel, its dispatch, and routing through SlotBank."""
import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit import kernels
from lorakit.adapters.peft_files import fingerprint, read_adapter
from lorakit.kernels.reference import lora_delta, lora_delta_loop
from lorakit.models import tiny_llama
from lorakit.serve.slots import SlotBank


def _slots(S=5, r=4, din=16, dout=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, r, din, generator=g)
    B = torch.randn(S, dout, r, generator=g)
    A[0], B[0] = 0, 0  # slot 0: no adapter
    return A, B


def test_single_slot_rows_match_definition():
    A, B = _slots()
    x = torch.randn(6, 3, 16)  # (b, s, in)
    idx = torch.tensor([[0], [1], [4], [1], [2], [3]])
    coef = torch.tensor([[1.0], [2.0], [0.5], [-1.0], [1.0], [3.0]])
    got = lora_delta(x, A, B, idx, coef)
    assert got.shape == (6, 3, 12)
    torch.testing.assert_close(got, lora_delta_loop(x, A, B, idx, coef), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros(3, 12))  # base row: exactly nothing added


def test_weighted_stack_is_exact_sum_of_deltas():
    A, B = _slots()
    x = torch.randn(3, 2, 16)
    idx = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 1, 2]])
    coef = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.2, -0.5, 1.5]])
    got = lora_delta(x, A, B, idx, coef)
    want = torch.stack([sum(float(coef[b, j]) * x[b] @ (B[idx[b, j]] @ A[idx[b, j]]).T for j in range(3))
                        for b in range(3)])  # full weight changes, summed
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dispatch_uses_registered_impl_for_device_type():
    A, B = _slots()
    x, idx, coef = torch.randn(2, 1, 16), torch.tensor([[1], [2]]), torch.ones(2, 1)
    calls = []

    def fake(*args):
        calls.append(args[0].shape)
        return lora_delta(*args) * 2

    want = lora_delta(x, A, B, idx, coef)
    assert torch.equal(kernels.lora_delta(x, A, B, idx, coef), want)  # default: the reference
    kernels.IMPLS["cpu"] = fake
    try:
        torch.testing.assert_close(kernels.lora_delta(x, A, B, idx, coef), 2 * want)
        assert calls == [(2, 1, 16)]
    finally:
        del kernels.IMPLS["cpu"]


def test_slot_bank_rows_match_per_adapter_forward(tmp_path):
    """A batch whose rows use different adapters (and a stack) == each row run with that adapter active."""
    src = tiny_llama()
    cfgs = {"a": LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False),
            "b": LoraConfig(r=8, alpha=4, targets="all-linear", init_lora_weights=False, use_rslora=True,
                            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 7.0})}  # per-layer scales
    for name, cfg in cfgs.items():
        add_adapter(src, cfg, name)
        save_adapter(src, tmp_path / name, name)
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    uses = [None, "a", "b", {"a": 0.6, "b": -0.4}]
    want = []
    for i, use in enumerate(uses):
        set_active(src, use)
        want.append(src(ids[i:i + 1]).logits[0])
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    bank = SlotBank(model, max_slots=2, base_fp=fingerprint(model))
    sa = bank.acquire("a@1", lambda: read_adapter(tmp_path / "a"))
    sb = bank.acquire("b@1", lambda: read_adapter(tmp_path / "b"))
    bank.set_batch(torch.tensor([[0, 0], [sa, 0], [sb, 0], [sa, sb]]),
                   torch.tensor([[0.0, 0], [1, 0], [1, 0], [0.6, -0.4]]))
    got = model(ids).logits
    for i in range(4):
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-5)
    # unloading leaves the base exactly as it was
    bank.release(sa), bank.release(sb)
    assert bank.unload("a@1") and bank.unload("b@1") and not bank.resident
    bank.set_batch(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1))
    set_active(src, None)
    torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_slot_bank_lru_evicts_unpinned_only(tmp_path):
    src = tiny_llama()
    for name in "abc":
        add_adapter(src, LoraConfig(r=2, targets=["q_proj"], init_lora_weights=False), name)
        save_adapter(src, tmp_path / name, name)
    bank = SlotBank(tiny_llama(), max_slots=2, base_fp=fingerprint(src))
    load = {n: (lambda n=n: read_adapter(tmp_path / n)) for n in "abc"}
    sa = bank.acquire("a", load["a"])
    sb = bank.acquire("b", load["b"])
    assert not bank.can_acquire(["c"])  # both pinned by running requests
    bank.release(sa)
    assert bank.can_acquire(["c"])
    sc = bank.acquire("c", load["c"])
    assert sc == sa and list(bank.resident) == ["b", "c"]  # a was least recently used and unpinned
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.A[sc, :2], read_adapter(tmp_path / "c").modules()["model.layers.0.self_attn.q_proj"]["lora_A"])
    assert sb != sc


def test_slot_bank_serves_dora_beside_lora_in_one_batch(tmp_path):
    """DoRA adapters in a mixed batch: rows of a DoRA adapter (per-layer scales too), a plain LoRA adapter, the
    base and stacks of both kinds == each row run offline with that adapter (or weighted stack) active."""
    src = tiny_llama()
    cfgs = {"d": LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False, use_dora=True,
                            alpha_pattern={"down_proj": 5.0}),
            "e": LoraConfig(r=2, alpha=2, targets=["q_proj", "o_proj"], init_lora_weights=False, use_dora=True),
            "p": LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)}
    g = torch.Generator().manual_seed(3)
    for name, cfg in cfgs.items():
        add_adapter(src, cfg, name)
        with torch.no_grad():  # a trained-looking magnitude: not the initial row norms (g != 1)
            for n, p in src.named_parameters():
                if n.endswith(f"{name}.lora_magnitude_vector") or f".{name}.lora_magnitude_vector" in n:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
        save_adapter(src, tmp_path / name, name)
    ids = torch.randint(3, 128, (6, 7), generator=torch.Generator().manual_seed(0))
    uses = [None, "d", "p", {"d": 0.6, "p": 0.4}, {"d": 0.5, "e": -0.7}, "e"]
    want = []
    for i, use in enumerate(uses):
        set_active(src, use)
        want.append(src(ids[i:i + 1]).logits[0])
    set_active(src, None)
    base_logits = src(ids).logits
    model = tiny_llama()
    bank = SlotBank(model, max_slots=3, base_fp=fingerprint(model))
    s = {n: bank.acquire(n, lambda n=n: read_adapter(tmp_path / n)) for n in cfgs}
    bank.set_batch(torch.tensor([[0, 0], [s["d"], 0], [s["p"], 0], [s["d"], s["p"]], [s["d"], s["e"]], [s["e"], 0]]),
                   torch.tensor([[0.0, 0], [1, 0], [1, 0], [0.6, 0.4], [0.5, -0.7], [1, 0]]))
    got = model(ids).logits
    for i in range(len(uses)):
        assert i == 0 or (want[i] - base_logits[i]).abs().max() > 1e-2, uses[i]  # every adapter changes the output
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-5)
    # a DoRA slot freed and taken by a plain adapter leaves no DoRA gain behind
    for n in cfgs:
        bank.release(s[n])
    assert bank.unload("d")
    sp2 = bank.acquire("p2", lambda: read_adapter(tmp_path / "p"))
    bank.set_batch(torch.tensor([[sp2]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(model(ids[2:3]).logits[0], want[2], rtol=1e-4, atol=1e-5)
