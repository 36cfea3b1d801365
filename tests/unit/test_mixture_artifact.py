"""The mixture artifact (adapters/mixtures.py): one directory naming and hashing its adapters and base, checked on
load; registry entries mix:<name> pinned to adapter versions; per-token coefficients in the kernel contract; the
server's slot bank running a mixture per token in a batch with base and single-adapter rows."""
import json
import shutil

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import content_sha256, fingerprint, load_adapter, read_adapter
from lorakit.adapters.mixtures import (MIXTURE_FILE, add_mixture, load_mixture, read_mixture, resolve_mixture,
                                       write_mixture)
from lorakit.adapters.registry import IncompatibleAdapter, Registry
from lorakit.cli.main import main
from lorakit.core.inject import adapter_names, disabled
from lorakit.core.mixture import Router
from lorakit.kernels import IMPLS
from lorakit import kernels
from lorakit.kernels.reference import lora_delta, lora_delta_loop
from lorakit.models import tiny_llama
from lorakit.serve.slots import SlotBank

CFGS = {"a": LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False),
        "b": LoraConfig(r=8, alpha=4, targets="all-linear", init_lora_weights=False,
                        alpha_pattern={"down_proj": 7.0})}  # a per-layer scale: folded into B in the slot bank


def _save_adapters(root, seed=0):
    src = tiny_llama()
    torch.manual_seed(seed)
    for name, cfg in CFGS.items():
        add_adapter(src, cfg, name)
        save_adapter(src, root / "adapters" / name, name)
    return src


def _mixture(root, seed=0):
    """Adapters a and b under root/adapters, a router with non-trivial gates over them in root/mix;
    -> the source model with the router attached."""
    src = _save_adapters(root, seed)
    set_active(src, ["a", "b"])
    router = Router(src, ["a", "b"], temperature=0.7)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    write_mixture(root / "mix", router, {n: root / "adapters" / n for n in "ab"}, fingerprint(src), "tiny")
    router.attach(src)
    return src


def test_artifact_round_trip_and_what_it_records(tmp_path, ids):
    src = _mixture(tmp_path)
    want = src(ids).logits
    m = tiny_llama()
    load_mixture(m, tmp_path / "mix")
    assert torch.equal(m(ids).logits, want)
    manifest = json.loads((tmp_path / "mix" / MIXTURE_FILE).read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["a", "b"]
    assert manifest["adapters"][1]["sha256"] == content_sha256(tmp_path / "adapters" / "b")
    assert manifest["base"]["shape_hash"] == fingerprint(m)["shape_hash"] and manifest["temperature"] == 0.7
    assert len(manifest["layers"]) == 14  # b adapts every linear layer of the 2-layer model
    with disabled(m):  # the base alone: the router is suspended too
        torch.testing.assert_close(m(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-6)
    assert torch.equal(m(ids).logits, want)


def test_the_tree_may_move_as_a_whole(tmp_path, ids):
    src = _mixture(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "one")  # recorded absolute paths gone: the relative ones still hold
    m = tiny_llama()
    load_mixture(m, tmp_path / "two" / "mix")
    assert torch.equal(m(ids).logits, src(ids).logits)


def test_missing_or_changed_adapter_is_named_and_nothing_is_loaded(tmp_path):
    _mixture(tmp_path)
    shutil.move(tmp_path / "adapters" / "a", tmp_path / "elsewhere")
    m = tiny_llama()
    with pytest.raises(FileNotFoundError, match=r"adapter 'a' \(sha256 [0-9a-f]{12}\.\.\.\), which is missing"):
        load_mixture(m, tmp_path / "mix")
    assert adapter_names(m) == []
    load_mixture(m, tmp_path / "mix", adapters={"a": tmp_path / "elsewhere"})  # told where it is now
    assert adapter_names(m) == ["a", "b"]
    other = tiny_llama()
    torch.manual_seed(5)
    add_adapter(other, CFGS["b"], "b")
    save_adapter(other, tmp_path / "adapters" / "b", "b")  # same name, other weights
    with pytest.raises(ValueError, match="adapter 'b', whose files at .* changed since the router was trained"):
        load_mixture(tiny_llama(), tmp_path / "mix", adapters={"a": tmp_path / "elsewhere"})


def test_other_base_is_refused_with_the_reason(tmp_path):
    _mixture(tmp_path)
    with pytest.raises(IncompatibleAdapter, match="another base: its layer shapes"):
        load_mixture(tiny_llama(hidden=32), tmp_path / "mix")
    with pytest.raises(IncompatibleAdapter, match="another base: its base weights"):
        load_mixture(tiny_llama(seed=1), tmp_path / "mix")  # same shapes, other weights


def test_broken_artifacts_are_refused_by_name(tmp_path):
    _mixture(tmp_path)
    mix = tmp_path / "mix"
    with pytest.raises(FileNotFoundError, match="holds no mixture.json"):
        read_mixture(tmp_path / "adapters" / "a")
    good = (mix / MIXTURE_FILE).read_text()
    (mix / MIXTURE_FILE).write_text(good.replace('"temperature": 0.7', '"temperature": -1'))
    with pytest.raises(ValueError, match="'temperature' must be a positive number"):
        read_mixture(mix)
    m = json.loads(good)
    m["layers"] = m["layers"][:-1]
    (mix / MIXTURE_FILE).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="unexpected .*down_proj"):
        read_mixture(mix)


# ---------------------------------------------------------------- registry
def test_registry_pins_mixtures_to_adapter_versions(tmp_path):
    src = _mixture(tmp_path)
    reg = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(src), base_name="tiny")
    with pytest.raises(IncompatibleAdapter, match="adapter 'a' .* is in no version of the registry"):
        add_mixture(reg, "ab", tmp_path / "mix")
    reg.add("a", tmp_path / "adapters" / "a")
    reg.add("b", tmp_path / "adapters" / "b")
    v = add_mixture(reg, "ab", tmp_path / "mix", description="a and b")
    assert (v.name, v.version, v.kind, v.config["pinned"]) == ("mix:ab", 1, "mixture", ["a@1", "b@1"])
    assert v.path == reg.store / "@mix" / "ab" / "v1" and (v.path / "router.safetensors").exists()
    assert v.sha256 == content_sha256(tmp_path / "mix", ("mixture.json", "router.safetensors"))
    assert add_mixture(reg, "mix:ab", tmp_path / "mix", skip_if_current=True).version == 1
    other = tiny_llama()
    torch.manual_seed(9)
    add_adapter(other, CFGS["a"], "a")
    save_adapter(other, tmp_path / "a2", "a")
    assert reg.add("a", tmp_path / "a2").version == 2  # a newer 'a': the mixture keeps its pin
    mix, ads = resolve_mixture(reg, "mix:ab")
    assert mix.ref == "mix:ab@1" and [a.ref for a in ads] == ["a@1", "b@1"]
    assert {x.name for x in reg.list()} == {"a", "b", "mix:ab"}
    reg.remove("a@1")
    with pytest.raises(IncompatibleAdapter, match="mix:ab@1 is pinned to adapter a@1, which is gone"):
        resolve_mixture(reg, "mix:ab@1")
    reg.add("a", tmp_path / "adapters" / "a")  # the same files again: a@3; registering again re-pins
    assert add_mixture(reg, "ab", tmp_path / "mix").config["pinned"] == ["a@3", "b@1"]
    assert reg.resolve("mix:ab").version == 2 and reg.rollback("mix:ab").version == 1
    with pytest.raises(ValueError, match="names starting with 'mix:' are mixtures"):
        reg.add("mix:a", tmp_path / "adapters" / "a")
    reg.close()
    reg = Registry(tmp_path / "reg.sqlite")  # reopening cleans leftovers, never a mixture's files
    assert (reg.store / "@mix" / "ab" / "v2").is_dir()
    assert [x.ref for x in reg.remove("mix:ab")] == ["mix:ab@1", "mix:ab@2"]
    assert not (reg.store / "@mix" / "ab").exists()
    reg.close()


# ---------------------------------------------------------------- kernel contract and slot bank
def test_per_token_coefficients_match_the_definition():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 4, 16, generator=g), torch.randn(5, 12, 4, generator=g)
    x = torch.randn(3, 5, 16, generator=g)
    idx = torch.tensor([[1, 2], [3, 0], [4, -1]])
    coef = torch.rand(3, 5, 2, generator=g)  # (b, s, k)
    got = lora_delta(x, A, B, idx, coef)
    torch.testing.assert_close(got, lora_delta_loop(x, A, B, idx, coef), rtol=1e-5, atol=1e-5)
    per_row = torch.rand(3, 2, generator=g)  # a (b, k) coef is the (b, s, k) one repeated over s
    torch.testing.assert_close(lora_delta(x, A, B, idx, per_row),
                               lora_delta(x, A, B, idx, per_row[:, None].expand(3, 5, 2)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"coef must be \(b, k\)"):
        lora_delta(x, A, B, idx, torch.rand(3, 4, 2))
    IMPLS["cpu"] = lambda *a, **k: pytest.fail("a per-token call reached the registered kernel")
    try:  # per-token coefficients always go to the reference
        torch.testing.assert_close(kernels.lora_delta(x, A, B, idx, coef), got, rtol=0, atol=0)
    finally:
        del IMPLS["cpu"]


def test_slot_bank_runs_a_mixture_per_token_beside_base_and_adapter_rows(tmp_path, ids):
    src = _mixture(tmp_path)
    ids = torch.cat([ids, ids[:1].flip(1)])  # (3, 12)
    want_mix = src(ids).logits
    ref = tiny_llama()
    for n in "ab":
        load_adapter(ref, tmp_path / "adapters" / n, n, activate=False)
    set_active(ref, "a")
    want_a = ref(ids).logits
    set_active(ref, None)
    want_base = ref(ids).logits
    set_active(ref, {"a": 0.5, "b": 0.5})
    uniform = ref(ids).logits
    for other in (want_base, want_a, uniform):  # the gates matter: the mixture row is none of these
        assert (want_mix[1] - other[1]).abs().max() > 1e-3
    model = tiny_llama()
    bank = SlotBank(model, max_slots=2, base_fp=fingerprint(model))
    sa = bank.acquire("a", lambda: read_adapter(tmp_path / "adapters" / "a"))
    sb = bank.acquire("b", lambda: read_adapter(tmp_path / "adapters" / "b"))
    bank.acquire_mixture("ab", lambda: read_mixture(tmp_path / "mix"))
    bank.set_batch(torch.tensor([[0, 0], [sa, sb], [sa, 0]]), torch.tensor([[0.0, 0], [1, 1], [1, 0]]),
                   [None, "ab", None])
    got = model(ids).logits  # prefill-shaped: every token of the mixture row gets its own gates
    torch.testing.assert_close(got[0], want_base[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want_mix[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2], want_a[2], rtol=1e-4, atol=1e-5)
    assert not bank.unload("ab")  # pinned by a running row
    bank.release_mixture("ab")
    assert bank.unload("ab") and not bank.mixtures
    with pytest.raises(IncompatibleAdapter, match="another base"):
        SlotBank(tiny_llama(seed=1), 2, fingerprint(tiny_llama(seed=1))).acquire_mixture(
            "ab", lambda: read_mixture(tmp_path / "mix"))


def test_cli_adapters_add_and_list_a_mixture(tmp_path, capsys):
    src = _mixture(tmp_path)
    path = str(tmp_path / "reg.sqlite")
    Registry(path, base_fp=fingerprint(src), base_name="tiny").close()
    assert main(["adapters", "add", "ab", str(tmp_path / "mix"), "--registry", path]) == 2  # adapters first
    assert "adapter 'a'" in capsys.readouterr().err
    for n in "ab":
        assert main(["adapters", "add", n, str(tmp_path / "adapters" / n), "--registry", path]) == 0
    assert main(["adapters", "add", "ab", str(tmp_path / "mix"), "--registry", path]) == 0
    assert main(["adapters", "list", "--registry", path]) == 0
    out = capsys.readouterr().out
    assert "added mix:ab@1 (current)" in out
    line = next(x for x in out.splitlines() if x.startswith("mix:ab"))
    assert line.split()[:3] == ["mix:ab", "1", "mix"] and line.endswith("over a@1, b@1")
    assert main(["adapters", "show", "mix:ab", "--registry", path]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["versions"][0]["kind"] == "mixture" and shown["versions"][0]["pinned"] == ["a@1", "b@1"]
