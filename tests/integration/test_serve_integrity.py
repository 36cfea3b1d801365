"""Integrity over a live server (uvicorn on loopback, httpx, a tiny random Llama): adapter folders a key holder
names are hostile (a FIFO, a link to /dev/zero or outside the folder, oversized files, a conv-shaped pair on a
linear layer): each add is a 400 naming the file or module while /health answers and victims' outputs stay
their solo outputs; a weights file swapped during an add (faults.hook at registry.copied) is not what gets
stored or served; an add racing a removal is a 201 or a 4xx; the |w| <= 10 bound holds per adapter version."""
import math
import os
import shutil
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, faults
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint
from lorakit.adapters.refs import content_sha256
from lorakit.adapters.registry import Registry
from lorakit.config import ServeConfig
from lorakit.models import load_base
from lorakit.serve.app import ServerThread, build_app, cpu_threads, make_state
from serve_helpers import save_noisy_adapter, tiny_base

pytestmark = pytest.mark.slow
KEY, ADMIN = "sk-integrity", "sk-integrity-admin"
H = {"Authorization": f"Bearer {KEY}"}
HA = {"Authorization": f"Bearer {ADMIN}"}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    root = tmp_path_factory.mktemp("integrity")
    tiny_base(root, hidden=64, layers=2)
    model, tok = load_base(str(root / "base"), device="cpu")
    qv = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False)
    for i, n in enumerate("abc"):
        save_noisy_adapter(model, root / n, qv, i + 1)
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="tiny")
    reg.add("a", root / "a")
    reg.add("a2", root / "a")  # the same files under a second name
    reg.add("b", root / "b")
    cfg = ServeConfig(api_keys=[KEY], admin_key=ADMIN, max_slots=4, max_batch=4, max_new_tokens=32)
    state = make_state(model, tok, reg, cfg, "tiny")
    server = ServerThread(build_app(state)).start()
    yield dict(root=root, state=state, url=server.url, reg=reg)
    server.stop()
    state.engine.stop()
    reg.close()
    torch.set_num_threads(threads)


def _gen(url, model, n=8):
    r = httpx.post(url + "/v1/completions", headers=H, timeout=60,
                   json={"model": model, "prompt": "Once upon a time", "max_tokens": n, "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True})
    return r.status_code, (r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.json()["error"])


def _add(url, name, path):
    return httpx.post(url + "/admin/adapters", headers=HA, json={"name": name, "path": str(path)}, timeout=60)


def _variant(root, name, edit):
    d = root / name
    shutil.copytree(root / "a", d)
    edit(d)
    return d


def _conv_pair(d):
    t = load_file(d / WEIGHTS_NAME)
    t[Q + ".lora_A.weight"] = t[Q + ".lora_A.weight"][:, :, None, None].repeat(1, 1, 3, 3).contiguous()
    t[Q + ".lora_B.weight"] = t[Q + ".lora_B.weight"][:, :, None, None].contiguous()
    save_file(t, str(d / WEIGHTS_NAME), metadata={"format": "pt"})


def _relink(d, name, target):
    (d / name).unlink()
    (d / name).symlink_to(target)


def test_hostile_folders_are_refused_naming_the_file_while_health_answers(srv):
    url, root, reg = srv["url"], srv["root"], srv["reg"]
    victims = {m: _gen(url, m) for m in ("a", "b", "tiny")}
    assert all(code == 200 for code, _ in victims.values()) and len({tuple(v) for _, v in victims.values()}) == 3
    secret = root / "secret.safetensors"
    shutil.copyfile(root / "b" / WEIGHTS_NAME, secret)
    cases = {
        "fifo": (lambda d: ((d / WEIGHTS_NAME).unlink(), os.mkfifo(d / WEIGHTS_NAME)),
                 f"{WEIGHTS_NAME}' is a FIFO, not a regular file"),
        "zero": (lambda d: _relink(d, CONFIG_NAME, "/dev/zero"),
                 f"{CONFIG_NAME}' is a link to '/dev/zero', outside the adapter folder"),
        "outside": (lambda d: _relink(d, WEIGHTS_NAME, secret),
                    f"{WEIGHTS_NAME}' is a link to '{secret}', outside the adapter folder"),
        "big": (lambda d: os.truncate(d / WEIGHTS_NAME, 1 << 40), f"{WEIGHTS_NAME}' holds 1,099,511,627,776 bytes"),
        "conv": (_conv_pair, "module 'model.layers.0.self_attn.q_proj' is a linear layer on the base, but the "
                             "adapter has lora_A (4, 64, 3, 3) and lora_B (64, 4, 1, 1)"),
    }
    for name, (edit, msg) in cases.items():
        d = _variant(root, name, edit)
        t0 = time.monotonic()
        r = _add(url, name, d)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], (name, r.text)
        assert time.monotonic() - t0 < 10, name  # refused without reading a FIFO, /dev/zero or a terabyte
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200 and time.monotonic() - t0 < 1
    assert {v.name for v in reg.list()} == {"a", "a2", "b"}
    assert {m: _gen(url, m) for m in victims} == victims  # victims' outputs are their solo outputs


def test_a_weights_file_swapped_during_an_add_is_not_stored_or_served(srv):
    url, root, reg = srv["url"], srv["root"], srv["reg"]
    src = root / "swap"
    shutil.copytree(root / "c", src)
    t = load_file(root / "c" / WEIGHTS_NAME)
    t[Q + ".lora_B.weight"].fill_(math.nan)
    save_file(t, str(root / "nan.safetensors"))
    c_sha = content_sha256(root / "c")

    def swap(n):  # both files are copied: the source's weights turn to NaN before the checks run
        if n == 1:
            os.replace(root / "nan.safetensors", src / WEIGHTS_NAME)

    with faults.hook("registry.copied", swap):
        r = _add(url, "swapped", src)
    assert r.status_code == 201, r.text
    assert content_sha256(src) != c_sha  # the source really changed under the add
    v = reg.resolve("swapped")
    assert v.sha256 == r.json()["sha256"] == c_sha == content_sha256(v.path)  # checked == hashed == stored
    code, ids = _gen(url, "swapped")
    assert code == 200 and ids != _gen(url, "tiny")[1]  # served, finite: c's weights, not NaN
    for x in reg.list():  # every stored version's recorded hash is its files' hash
        for ver in reg.versions(x.name):
            assert content_sha256(ver.path) == ver.sha256, ver.ref


def test_an_add_racing_a_remove_of_the_same_name(srv):
    url, root, reg = srv["url"], srv["root"], srv["reg"]
    assert _add(url, "race", root / "a").status_code == 201
    removed = []

    def remove_meanwhile(n):  # another admin removes the name while this add copies
        if n == 1:
            removed.append(httpx.delete(url + "/admin/adapters/race", headers=HA, timeout=60))

    with faults.hook("registry.copied", remove_meanwhile):
        r = _add(url, "race", root / "b")
    assert removed[0].status_code == 200 and removed[0].json()["removed"] == ["race@1"]
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    assert _gen(url, "race") == _gen(url, "b")

    added = []
    with faults.hook("registry.removed", lambda n: added.append(reg.add("race", root / "c"))):  # and the reverse
        r = httpx.delete(url + "/admin/adapters/race", headers=HA, timeout=60)
    assert r.status_code == 200 and r.json()["removed"] == ["race@2"] and added[0].version == 3
    assert content_sha256(reg.resolve("race").path) == content_sha256(root / "c")  # its files survived
    code, ids = _gen(url, "race")
    assert code == 200 and ids != _gen(url, "b")[1]
    assert httpx.delete(url + "/admin/adapters/race@9", headers=HA).status_code == 404


def test_the_weight_bound_holds_per_adapter_version(srv):
    url = srv["url"]
    for model in ("a:10+a@1:10", "a:6+a@1:-5", "a:10+a2:10", "a:4+a@1:4+a2:4"):
        code, err = _gen(url, model)
        assert code == 400 and err["param"] == "model", (model, err)
        assert "the limit is 10 per adapter version" in err["message"], err
    code, ids = _gen(url, "a:5+a@1:5")  # one version twice at 5: as once at 10
    assert code == 200 and (200, ids) == _gen(url, "a:10")
    assert _gen(url, "a:10+b:10")[0] == 200  # two versions at 10 each stay allowed
