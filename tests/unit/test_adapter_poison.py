"""Poisoned adapter files through every entry point: read/validate, load_adapter, the registry (API and
`lorakit adapters add`), `lorakit merge`, and the server's slot load. Each is refused with an error naming
the file, and whatever the entry point would have changed is exactly as it was."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint, read_adapter, validate_adapter
from lorakit.adapters.registry import Registry
from lorakit.cli.main import main
from lorakit.core.inject import active_adapters, adapter_names
from lorakit.models import tiny_llama
from lorakit.serve.slots import SlotBank

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("poison") / "good"
    m = tiny_llama()
    torch.manual_seed(0)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(m, d)
    return d


def _tensors(fn):
    def edit(d):
        t = load_file(d / WEIGHTS_NAME)
        fn(t)
        save_file(t, str(d / WEIGHTS_NAME))
    return edit


def _config(**kw):
    def edit(d):
        cfg = json.loads((d / CONFIG_NAME).read_text())
        cfg.update(kw)
        (d / CONFIG_NAME).write_text(json.dumps(cfg))  # json writes NaN / Infinity as those bare words
    return edit


def _truncate(d):
    raw = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])


def _wrong_base(d):
    m = tiny_llama(hidden=32)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False))
    shutil.rmtree(d)
    save_adapter(m, d)


POISONS = {
    "nan_B": (_tensors(lambda t: t[Q + ".lora_B.weight"].view(-1)[3:5].fill_(math.nan)), "non-finite"),
    "inf_A": (_tensors(lambda t: t[Q + ".lora_A.weight"].view(-1)[0:1].fill_(math.inf)), "non-finite"),
    "nan_alpha": (_config(lora_alpha=math.nan), "alpha"),
    "inf_alpha": (_config(lora_alpha=math.inf), "alpha"),
    "zero_alpha": (_config(lora_alpha=0), "alpha"),
    "negative_alpha": (_config(lora_alpha=-8), "alpha"),
    "string_alpha": (_config(lora_alpha="8"), "alpha"),
    "nan_alpha_pattern": (_config(alpha_pattern={"q_proj": math.nan}), "alpha_pattern"),
    "zero_r": (_config(r=0), "r must be"),
    "float_r": (_config(r=4.5), "r must be"),
    "rank_mismatch": (_tensors(lambda t: t.__setitem__(Q + ".lora_B.weight", t[Q + ".lora_B.weight"][:, :3].contiguous())),
                      "same rank"),
    "config_rank_mismatch": (_config(r=8), "rank 4 in its tensors but r=8"),
    "overflowing": (_tensors(lambda t: t[Q + ".lora_B.weight"].fill_(1e30)), "could change a weight"),
    "int_tensor": (_tensors(lambda t: t.__setitem__(Q + ".lora_A.weight", t[Q + ".lora_A.weight"].to(torch.int32))),
                   "floating-point"),
    "dora_without_flag": (_tensors(lambda t: t.__setitem__(Q + ".lora_magnitude_vector", torch.ones(64))),
                          "use_dora is false"),
    "truncated": (_truncate, "not a readable safetensors"),
    "wrong_base": (_wrong_base, r"\(32, 32\)"),
}


@pytest.fixture(params=sorted(POISONS))
def poisoned(request, good, tmp_path):
    d = tmp_path / request.param
    shutil.copytree(good, d)
    edit, msg = POISONS[request.param]
    edit(d)
    return d, msg


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [type(x) for x in m.modules()],
            active_adapters(m), adapter_names(m), [p.requires_grad for p in m.parameters()])


def _same(m, snap):
    state, types_, active, names, grads = snap
    now = m.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(x) for x in m.modules()] == types_ and active_adapters(m) == active
    assert adapter_names(m) == names and [p.requires_grad for p in m.parameters()] == grads


def test_read_and_validate(poisoned):
    d, msg = poisoned
    with pytest.raises(ValueError, match=msg) as e:
        validate_adapter(read_adapter(d), fingerprint(tiny_llama()))
    assert str(d) in str(e.value) or "another base" in str(e.value) or "(32, 32)" in str(e.value)


def test_load_adapter_changes_nothing(poisoned, good):
    d, msg = poisoned
    m = tiny_llama()
    load_adapter(m, good, "keep")  # a model already holding an adapter
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=msg):
        load_adapter(m, d, "bad")
    _same(m, snap)


def test_registry_and_cli_add_refuse(poisoned, tmp_path, capsys):
    d, msg = poisoned
    reg = Registry(tmp_path / "r.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    with pytest.raises(ValueError, match=msg):
        reg.add("x", d)
    reg.close()
    assert main(["adapters", "add", "x", str(d), "--registry", str(tmp_path / "r.sqlite")]) == 2
    assert "error" in capsys.readouterr().err
    reg = Registry(tmp_path / "r.sqlite")
    assert reg.list() == [] and not any(reg.store.rglob(WEIGHTS_NAME))
    reg.close()


def test_server_slot_load_refuses(poisoned):
    d, msg = poisoned
    m = tiny_llama()
    bank = SlotBank(m, 2, fingerprint(m))
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=msg):
        bank.acquire("bad", lambda: read_adapter(d))
    assert not bank.resident and bank.pins == [0, 0, 0]
    _same(m, snap)


@pytest.mark.parametrize("name", ["nan_B", "rank_mismatch", "nan_alpha", "truncated"])
def test_merge_command_refuses_naming_the_file(name, good, tiny_dir, tmp_path, capsys):
    d = tmp_path / name
    shutil.copytree(good, d)
    POISONS[name][0](d)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_dir), "--adapter", str(d), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lorakit merge: error" in err and str(d) in err and "Traceback" not in err
    assert not out.exists()
