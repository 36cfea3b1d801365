"""The SQLite adapter registry: versions, rollback, removal, refusals, atomicity, and its CLI."""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import WEIGHTS_NAME, fingerprint
from lorakit.cli.main import main
from lorakit.models import tiny_llama
from lorakit.adapters.registry import IncompatibleAdapter, Registry, UnknownAdapter, parse_ref, validate_name

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _adapter(path, seed=0, hidden=64, model_seed=0, dora=False, metadata=None):
    m = tiny_llama(seed=model_seed, hidden=hidden)
    torch.manual_seed(seed)
    add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False, use_dora=dora))
    save_adapter(m, path, metadata=metadata)
    return path


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    yield r
    r.close()


def test_versions_rollback_remove_and_persistence(tmp_path, reg):
    v1 = reg.add("support", _adapter(tmp_path / "s1", seed=1), description="first")
    v2 = reg.add("support", _adapter(tmp_path / "s2", seed=2))
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("support").version == 2 and reg.resolve("support@1").version == 1
    # files were copied, byte for byte, into the registry's store
    assert (v1.path / WEIGHTS_NAME).read_bytes() == (tmp_path / "s1" / WEIGHTS_NAME).read_bytes()
    assert v1.path.parent.parent == reg.store
    assert reg.rollback("support").version == 1
    reg.close()
    again = Registry(tmp_path / "reg.sqlite")  # persistent: a new process sees the same state
    assert again.resolve("support").version == 1
    assert again.base_name == "tiny" and again.base_fp["shape_hash"] == fingerprint(tiny_llama())["shape_hash"]
    assert again.rollback("support", to=2).version == 2
    assert [v.version for v in again.versions("support")] == [1, 2]
    again.remove("support@2")  # removing the current version: the newest left becomes current
    assert again.resolve("support").version == 1 and not v2.path.exists()
    assert again.add("support", tmp_path / "s2").version == 3  # numbers are never reused
    d = again.describe("support")
    assert (d["description"], d["current_version"], [v["version"] for v in d["versions"]]) == ("first", 3, [1, 3])
    again.remove("support")
    with pytest.raises(UnknownAdapter, match="support"):
        again.resolve("support")
    assert not (again.store / "support").exists()
    again.close()


def test_rollback_errors(tmp_path, reg):
    reg.add("a", _adapter(tmp_path / "a"))
    with pytest.raises(ValueError, match="no version older"):
        reg.rollback("a")
    with pytest.raises(UnknownAdapter, match="no version 7"):
        reg.rollback("a", to=7)
    with pytest.raises(UnknownAdapter):
        reg.rollback("nope")


def test_refuses_adapter_for_another_base_and_stores_nothing(tmp_path, reg):
    with pytest.raises(IncompatibleAdapter, match=r"another base: module 'model.layers.0.self_attn.q_proj' "
                                                  r"is \(out, in\)=\(32, 32\)"):
        reg.add("wide", _adapter(tmp_path / "w", hidden=32))
    with pytest.raises(IncompatibleAdapter, match="base weights"):  # same shapes, other weights
        reg.add("other", _adapter(tmp_path / "o", model_seed=1))
    assert reg.list() == [] and not any(reg.store.glob("*/v*"))
    assert reg.add("other", tmp_path / "o", force=True).version == 1  # same shapes: force accepts


def test_refuses_bad_names_corrupt_files_and_dora(tmp_path, reg):
    good = _adapter(tmp_path / "good")
    for name in ["../etc", "/abs/path", "a/b", "", ".hidden", "x" * 65, "a b", None]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            reg.add(name, good)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (bad / WEIGHTS_NAME).write_bytes((good / WEIGHTS_NAME).read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors"):
        reg.add("bad", bad)
    with pytest.raises(FileNotFoundError):
        reg.add("missing", tmp_path / "missing")
    assert reg.list() == []
    assert reg.add("good", good).version == 1  # still fine afterwards
    assert sorted(p.name for p in reg.store.iterdir()) == [".staging", "good"]  # no temp dirs left behind
    assert not any((reg.store / ".staging").iterdir())  # nor the private copies the checks read
    assert reg.add("dora", _adapter(tmp_path / "dora", dora=True)).version == 1  # DoRA is served (serve/slots.py)
    assert parse_ref("good@3") == ("good", 3) and validate_name("a-b_1") == "a-b_1"
    with pytest.raises(ValueError, match="version"):
        parse_ref("good@0")


def test_evals_per_version_and_base(tmp_path, reg):
    reg.add("a", _adapter(tmp_path / "a", metadata={"metrics": {"loss": 1.5}}))
    reg.add_eval("a@1", {"exact_match": 0.4})
    evals = reg.resolve("a").evals
    assert [e["metrics"] for e in evals] == [{"loss": 1.5}, {"exact_match": 0.4}]
    assert evals[0]["base_shape_hash"] == reg.base_fp["shape_hash"]
    with pytest.raises(ValueError, match="non-empty"):
        reg.add_eval("a", {})


def test_registry_bound_to_its_base(tmp_path, reg):
    with pytest.raises(IncompatibleAdapter, match="belongs to base 'tiny'"):
        Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(tiny_llama(hidden=32)), base_name="wide")
    con = sqlite3.connect(tmp_path / "reg.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite registry"):
        Registry(tmp_path / "junk.sqlite")


def test_cli_add_list_show_rollback_remove(tmp_path, reg, capsys):
    path = str(reg.path)
    a1, a2 = _adapter(tmp_path / "a1", seed=1), _adapter(tmp_path / "a2", seed=2)
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"accuracy": 0.9}))
    assert main(["adapters", "add", "tone", str(a1), "--registry", path]) == 0
    assert main(["adapters", "add", "tone", str(a2), "--registry", path, "--metrics", str(metrics)]) == 0
    assert main(["adapters", "list", "--registry", path, "--json"]) == 0
    out = capsys.readouterr().out
    assert "added tone@2 (current)" in out
    listed = json.loads(out[out.index("["):])
    assert [(v["name"], v["version"]) for v in listed] == [("tone", 2)]
    assert listed[0]["evals"][0]["metrics"] == {"accuracy": 0.9}
    assert main(["adapters", "rollback", "tone", "--registry", path]) == 0
    assert main(["adapters", "show", "tone", "--registry", path]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown[shown.index("{"):])["current_version"] == 1
    assert main(["adapters", "remove", "tone@1", "--registry", path]) == 0
    assert main(["adapters", "show", "nope", "--registry", path]) == 2  # one-line error, exit 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert Registry(path).resolve("tone").version == 2


@pytest.mark.slow
def test_cli_refuses_other_base_with_reason(tmp_path, reg):
    wide = _adapter(tmp_path / "w", hidden=32)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "lorakit", "adapters", "add", "wide", str(wide),
                        "--registry", str(reg.path)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "adapter is for another base" in p.stderr and "(32, 32)" in p.stderr
    assert reg.list() == []


def test_numbers_never_repeat_after_removing_everything(tmp_path, reg):
    a1, a2 = _adapter(tmp_path / "a1", seed=1), _adapter(tmp_path / "a2", seed=2)
    assert reg.add("n", a1).version == 1
    reg.remove("n@1")  # the last version
    with pytest.raises(UnknownAdapter):
        reg.resolve("n")
    assert reg.add("n", a2).version == 2
    reg.remove("n")  # the whole name
    assert [v.name for v in reg.list()] == []
    v = reg.add("n", a1)
    assert v.version == 3 and reg.describe("n")["versions"][0]["version"] == 3
    reg.close()
    assert Registry(tmp_path / "reg.sqlite").add("n", a2).version == 4  # persisted


def test_opening_removes_leftovers_of_interrupted_changes(tmp_path, reg):
    v = reg.add("k", _adapter(tmp_path / "k"))
    tmp = reg.store / "k" / ".v2.tmp-99999-123"  # a killed add's copy in progress
    tmp.mkdir()
    (tmp / WEIGHTS_NAME).write_bytes(b"half")
    orphan = reg.store / "k" / "v7"  # renamed into place, killed before the row was committed
    orphan.mkdir()
    reg.close()
    again = Registry(tmp_path / "reg.sqlite")
    assert not tmp.exists() and not orphan.exists() and v.path.exists()
    assert sorted(p.name for p in (again.store / "k").iterdir()) == ["v1"]
    assert again.add("k", tmp_path / "k").version == 2
    again.close()
