"""Adapter intake (adapters/intake.py): only regular files inside the adapter folder are read, sizes are capped
before reading, and the copy is made first and is what is checked, hashed and stored. Files are swapped and
adapters removed at named points (faults.hook), never by sleeping."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_adapter, faults, save_adapter
from lorakit.adapters.intake import MAX_JSON_BYTES, adapter_cap
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint, read_adapter
from lorakit.adapters.refs import content_sha256
from lorakit.adapters.registry import Registry
from lorakit.models import tiny_llama


def _adapter(path, seed):
    m = tiny_llama()
    torch.manual_seed(seed)
    add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
    return save_adapter(m, path)


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    yield r
    r.close()


@pytest.fixture
def good(tmp_path):
    return _adapter(tmp_path / "good", 1)


def _nan_weights(src, dest):
    t = load_file(src / WEIGHTS_NAME)
    next(iter(t.values())).fill_(math.nan)
    save_file(t, str(dest))


def _consistent(reg):
    """Every stored version's recorded hash is the hash of its stored files."""
    for v in reg.list():
        for ver in reg.versions(v.name):
            assert content_sha256(ver.path) == ver.sha256, ver.ref


def _variant(tmp_path, good, name):
    d = tmp_path / name
    shutil.copytree(good, d)
    return d


def test_special_files_and_links_outside_are_refused_naming_the_file(tmp_path, reg, good):
    fifo = _variant(tmp_path, good, "fifo")
    (fifo / WEIGHTS_NAME).unlink()
    os.mkfifo(fifo / WEIGHTS_NAME)  # opened blocking, this add would wait for a writer forever
    zero = _variant(tmp_path, good, "zero")
    (zero / CONFIG_NAME).unlink()
    (zero / CONFIG_NAME).symlink_to("/dev/zero")  # read to the end, it never ends
    outside = _variant(tmp_path, good, "outside")
    (outside / WEIGHTS_NAME).unlink()
    (outside / WEIGHTS_NAME).symlink_to(good / WEIGHTS_NAME)
    folder = _variant(tmp_path, good, "folder")
    (folder / WEIGHTS_NAME).unlink()
    (folder / WEIGHTS_NAME).mkdir()
    big = _variant(tmp_path, good, "big")
    cap = adapter_cap(reg.base_fp)
    os.truncate(big / WEIGHTS_NAME, cap + 1)  # sparse: refused by its size, never read
    bigcfg = _variant(tmp_path, good, "bigcfg")
    os.truncate(bigcfg / CONFIG_NAME, MAX_JSON_BYTES + 1)
    cases = [(fifo, f"{fifo / WEIGHTS_NAME}' is a FIFO, not a regular file"),
             (zero, f"{zero / CONFIG_NAME}' is a link to '/dev/zero', outside the adapter folder"),
             (outside, f"{outside / WEIGHTS_NAME}' is a link to '{good / WEIGHTS_NAME}', outside the adapter folder"),
             (folder, f"{folder / WEIGHTS_NAME}' is a directory, not a regular file"),
             (big, f"{big / WEIGHTS_NAME}' holds {cap + 1:,} bytes; the limit for {WEIGHTS_NAME} is {cap:,}"),
             (bigcfg, f"{bigcfg / CONFIG_NAME}' holds {MAX_JSON_BYTES + 1:,} bytes; the limit for {CONFIG_NAME}")]
    for d, msg in cases:
        with pytest.raises(ValueError) as e:
            reg.add("x", d)
        assert msg in str(e.value), (d.name, str(e.value))
    assert reg.list() == [] and not any((reg.store / ".staging").iterdir())
    assert cap < 128 << 20 < adapter_cap(None)  # the tiny base at full rank in float64 + a header, not 64 GiB
    for d, kind in ((fifo, "FIFO"), (zero, "character device"), (folder, "directory")):  # the library's own read
        with pytest.raises(ValueError, match=f"is a {kind}, not a regular file"):  # (links followed) refuses them
            read_adapter(d)
    inside = _variant(tmp_path, good, "inside")  # a link that stays inside the folder is an ordinary file
    (inside / WEIGHTS_NAME).rename(inside / "w.safetensors")
    (inside / WEIGHTS_NAME).symlink_to("w.safetensors")
    v = reg.add("x", inside)
    assert v.sha256 == content_sha256(good) and not (v.path / WEIGHTS_NAME).is_symlink()


def test_a_file_swapped_after_the_copy_is_not_what_is_stored(tmp_path, reg, good):
    good_sha, good_bytes = content_sha256(good), (good / WEIGHTS_NAME).read_bytes()
    src = _variant(tmp_path, good, "src")
    _nan_weights(good, tmp_path / "nan.safetensors")

    def swap_weights(n):  # once both files are copied, the source's weights become NaN
        if n == 1:
            shutil.copyfile(tmp_path / "nan.safetensors", src / WEIGHTS_NAME)

    with faults.hook("registry.copied", swap_weights):
        v = reg.add("s", src)
    assert v.sha256 == good_sha == content_sha256(v.path)  # the checked bytes, hashed and stored
    assert (v.path / WEIGHTS_NAME).read_bytes() == good_bytes
    assert torch.isfinite(next(iter(load_file(v.path / WEIGHTS_NAME).values()))).all()

    src2 = _variant(tmp_path, good, "src2")

    def swap_before_weights(n):  # the config is copied; the weights are swapped before their copy: NaN copied
        if n == 0:
            shutil.copyfile(tmp_path / "nan.safetensors", src2 / WEIGHTS_NAME)

    with faults.hook("registry.copied", swap_before_weights), pytest.raises(ValueError) as e:
        reg.add("s", src2)
    assert "non-finite" in str(e.value) and str(src2 / WEIGHTS_NAME) in str(e.value)  # names the client's file
    assert ".staging" not in str(e.value)

    other = _adapter(tmp_path / "other", 2)
    src3 = _variant(tmp_path, good, "src3")

    def swap_to_other(n):  # swapped to another valid adapter before its copy: that one is what is stored
        if n == 0:
            shutil.copyfile(other / WEIGHTS_NAME, src3 / WEIGHTS_NAME)

    with faults.hook("registry.copied", swap_to_other):
        v3 = reg.add("s", src3)
    assert v3.sha256 == content_sha256(other) != good_sha
    assert [v.version for v in reg.versions("s")] == [1, 2]
    _consistent(reg)


def test_an_add_racing_a_remove_of_the_same_name(tmp_path, reg, good):
    reg.add("r", good)
    other = _adapter(tmp_path / "other", 2)

    with faults.hook("registry.copied", lambda n: n == 1 and reg.remove("r")):  # removed while we copy
        v = reg.add("r", other)
    assert v.version == 2 and [x.version for x in reg.versions("r")] == [2]
    assert reg.resolve("r").sha256 == content_sha256(other) == content_sha256(v.path)

    added = []
    with faults.hook("registry.removed", lambda n: added.append(reg.add("r", good))):  # added while we delete
        gone = reg.remove("r")
    assert [x.version for x in gone] == [2] and not gone[0].path.exists()
    assert [x.version for x in reg.versions("r")] == [3] == [added[0].version]
    assert (reg.store / "r" / "v3").is_dir() and content_sha256(reg.resolve("r").path) == content_sha256(good)
    _consistent(reg)
    reg.remove("r")
    assert not (reg.store / "r").exists()


def test_a_mixture_is_copied_before_it_is_checked(tmp_path, reg, good):
    from lorakit.adapters.mixtures import FILES, MIXTURE_FILE, add_mixture

    d = tmp_path / "mix"
    d.mkdir()
    (d / MIXTURE_FILE).symlink_to("/dev/zero")
    (d / FILES[1]).write_bytes(b"")
    with pytest.raises(ValueError, match=f"{d / MIXTURE_FILE}' is a link to '/dev/zero', outside"):
        add_mixture(reg, "m", d)
    (d / MIXTURE_FILE).unlink()
    (d / MIXTURE_FILE).write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ValueError) as e:
        add_mixture(reg, "m", d)
    assert str(d / MIXTURE_FILE) in str(e.value) and ".staging" not in str(e.value)


def _reshaped(tmp_path, good, name, edit):
    d = _variant(tmp_path, good, name)
    t = load_file(good / WEIGHTS_NAME)
    edit(t)
    save_file(t, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    return d


def test_tensors_must_have_the_layout_of_the_bases_layer_kind(tmp_path, good):
    base = tiny_llama()
    fp = fingerprint(base)
    assert fp["kinds"]["model.layers.0.self_attn.q_proj"] == "linear"
    assert fp["kinds"]["model.embed_tokens"] == "embedding"
    old = {k: v for k, v in fp.items() if k not in ("kinds", "kernels")}  # a registry made before kinds
    Registry(tmp_path / "old.sqlite", base_fp=old, base_name="tiny").close()
    reg = Registry(tmp_path / "old.sqlite", base_fp=fp, base_name="tiny")  # opened with the model: kinds recorded
    assert Registry(tmp_path / "old.sqlite").base_fp["kinds"] == fp["kinds"]
    q = "base_model.model.model.layers.0.self_attn.q_proj"

    def conv_pair(t):  # A (r, in, 3, 3), B (out, r, 1, 1): a conv layer's pair, (out, in) as the linear layer's
        t[q + ".lora_A.weight"] = t[q + ".lora_A.weight"][:, :, None, None].repeat(1, 1, 3, 3).contiguous()
        t[q + ".lora_B.weight"] = t[q + ".lora_B.weight"][:, :, None, None].contiguous()

    def embedding_keys(t):
        t[q + ".lora_embedding_A"] = t.pop(q + ".lora_A.weight")
        t[q + ".lora_embedding_B"] = t.pop(q + ".lora_B.weight")

    for name, edit, msg in [
            ("conv", conv_pair, "module 'model.layers.0.self_attn.q_proj' is a linear layer on the base, but the "
                                "adapter has lora_A (4, 64, 3, 3) and lora_B (64, 4, 1, 1); expected (r, in) and (out, r)"),
            ("embkeys", embedding_keys, "module 'model.layers.0.self_attn.q_proj' is a linear layer on the base; its "
                                        "tensors must be named .lora_A.weight/lora_B.weight")]:
        d = _reshaped(tmp_path, good, name, edit)
        for check in (lambda: reg.add("x", d), lambda: read_and_validate(d, fp)):
            with pytest.raises(ValueError) as e:
                check()
            assert msg in str(e.value) and str(d / WEIGHTS_NAME) in str(e.value), str(e.value)
            assert type(e.value) is ValueError  # a malformed file (400), not another base (409)
    assert reg.list() == []
    reg.close()


def read_and_validate(d, fp):
    from lorakit.adapters.peft_files import validate_adapter

    return validate_adapter(read_adapter(d), fp)


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, reg, good, capsys):
    from lorakit.cli.main import main

    fifo = _variant(tmp_path, good, "fifo")
    (fifo / WEIGHTS_NAME).unlink()
    os.mkfifo(fifo / WEIGHTS_NAME)
    zero = _variant(tmp_path, good, "zero")
    (zero / CONFIG_NAME).unlink()
    (zero / CONFIG_NAME).symlink_to("/dev/zero")
    badpat = _variant(tmp_path, good, "badpat")
    cfg = json.loads((good / CONFIG_NAME).read_text())
    (badpat / CONFIG_NAME).write_text(json.dumps({**cfg, "rank_pattern": {"(": 8}}))
    path = str(reg.path)
    for d, msg in ((fifo, "is a FIFO, not a regular file"), (zero, "is a link to '/dev/zero', outside the adapter"),
                   (badpat, "rank_pattern"), (tmp_path / "nowhere", "does not exist")):
        capsys.readouterr()
        assert main(["adapters", "add", "x", str(d), "--registry", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lorakit adapters: error: ") and msg in err[0], err


def test_the_postgresql_registry_stores_the_checked_copy_too(tmp_path, good, pg_url):
    from lorakit.adapters.registry_pg import PgRegistry

    reg = PgRegistry(pg_url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=tmp_path / "store")
    try:
        src = _variant(tmp_path, good, "src")
        _nan_weights(good, tmp_path / "nan.safetensors")
        with faults.hook("registry.copied", lambda n: n == 1 and os.replace(tmp_path / "nan.safetensors",
                                                                            src / WEIGHTS_NAME)):
            v = reg.add("s", src)
        assert v.sha256 == content_sha256(good) == content_sha256(reg.local_files(v))
        other = _adapter(tmp_path / "other", 2)
        with faults.hook("registry.copied", lambda n: n == 1 and reg.remove("s")):  # removed while we copy
            v2 = reg.add("s", other)
        assert [x.version for x in reg.versions("s")] == [2] == [v2.version]
        assert content_sha256(reg.local_files(reg.resolve("s"))) == content_sha256(other)
    finally:
        reg.close()
