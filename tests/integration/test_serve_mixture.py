"""A mixture of LoRAs through the real server (uvicorn on loopback, the `openai` client): `mix:name` runs per token
in the same decode steps as base and single-adapter rows, and its greedy tokens equal offline generation with the
same mixture (lorakit.adapters.mixtures.load_mixture); streaming the same; pins and bad names refused clearly."""

import httpx
import openai
import pytest
import torch

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import fingerprint
from lorakit.adapters.mixtures import add_mixture, load_mixture, write_mixture
from lorakit.adapters.registry import Registry
from lorakit.config import ServeConfig
from lorakit.core.mixture import Router
from lorakit.generate import encode_prompt, generate_ids
from lorakit.models import load_base
from lorakit.serve.app import ServerThread, build_app, make_state
from serve_helpers import tiny_base, together

pytestmark = pytest.mark.slow
KEY, ADMIN = "sk-mix", "sk-mix-admin"
MSGS = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixserve")
    tiny_base(root)
    model, tok = load_base(str(root / "base"), device="cpu")
    src, _ = load_base(str(root / "base"), device="cpu")
    torch.manual_seed(0)
    for name, cfg in (("a", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False)),
                      ("b", LoraConfig(r=8, alpha=8, targets="all-linear", init_lora_weights=False))):
        add_adapter(src, cfg, name)
        with torch.no_grad():  # non-trivial B so every adapter changes the output
            for p in src.parameters():
                if p.requires_grad:
                    p.mul_(3.0)
        save_adapter(src, root / name, name)
    set_active(src, ["a", "b"])
    router = Router(src, ["a", "b"])
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    write_mixture(root / "ab", router, {"a": root / "a", "b": root / "b"}, fingerprint(src), "tiny")
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="tiny")
    reg.add("a", root / "a")
    reg.add("b", root / "b")
    add_mixture(reg, "ab", root / "ab")
    cfg = ServeConfig(api_keys=[KEY], admin_key=ADMIN, max_slots=4, max_batch=8, max_new_tokens=64)
    state = make_state(model, tok, reg, cfg, "tiny")
    server = ServerThread(build_app(state)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield dict(root=root, tok=tok, state=state, url=server.url, client=client, reg=reg)
    server.stop()
    state.engine.stop()
    reg.close()


def offline(env, use, n=12):
    """Greedy generation outside the server: a fresh model with the adapters, or with the mixture."""
    m, _ = load_base(str(env["root"] / "base"), device="cpu")
    if use == "mix":
        load_mixture(m, env["root"] / "ab")
    elif use is not None:
        load_adapter(m, env["root"] / use, use)
    return generate_ids(m, env["tok"], [encode_prompt(env["tok"], MSGS)], max_new_tokens=n)[0]


def chat(env, model, n=12):
    r = env["client"].chat.completions.create(model=model, messages=MSGS, max_tokens=n, temperature=0,
                                              extra_body={"return_token_ids": True})
    return r.choices[0].model_extra["token_ids"]


def stream(env, model, n=12):
    ids = []
    for ch in env["client"].chat.completions.create(model=model, messages=MSGS, max_tokens=n, temperature=0,
                                                    stream=True, extra_body={"return_token_ids": True}):
        ids += (ch.choices[0].model_extra or {}).get("token_ids") or [] if ch.choices else []
    return ids


def test_mixture_in_a_mixed_batch_equals_offline_generation(env):
    want = {"tiny": offline(env, None), "a": offline(env, "a"), "mix:ab": offline(env, "mix")}
    uniform = generate_ids(*_uniform(env), max_new_tokens=12)[0]
    assert len({tuple(w) for w in want.values()} | {tuple(uniform)}) == 4  # the router's gates change the tokens
    calls = [lambda: chat(env, "tiny"), lambda: chat(env, "a"), lambda: chat(env, "mix:ab"),
             lambda: stream(env, "mix:ab@1")]
    got, rows = together(env, calls)
    assert rows == 4  # base, adapter and two mixture rows decoded in the same steps
    assert got == [want["tiny"], want["a"], want["mix:ab"], want["mix:ab"]]
    health = httpx.get(env["url"] + "/health").json()["engine"]
    assert health["resident_mixtures"] == ["mix:ab@1"] and {"a@1", "b@1"} <= set(health["resident"])
    ids = [m.id for m in env["client"].models.list().data]
    assert {"mix:ab", "mix:ab@1"} <= set(ids)


def _uniform(env):
    m, _ = load_base(str(env["root"] / "base"), device="cpu")
    for n in "ab":
        load_adapter(m, env["root"] / n, n, activate=False)
    set_active(m, {"a": 0.5, "b": 0.5})
    return m, env["tok"], [encode_prompt(env["tok"], MSGS)]


def test_bad_mixture_requests_get_clear_errors(env):
    with pytest.raises(openai.BadRequestError, match="a mixture runs alone"):
        chat(env, "mix:ab+a")
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'mix:zz'"):
        chat(env, "mix:zz")
    with pytest.raises(openai.NotFoundError, match="'mix:ab' has versions \\[1\\]"):
        chat(env, "mix:ab@7")


def test_a_pinned_version_that_is_gone_is_refused(env):
    reg, root = env["reg"], env["root"]
    reg.add("a2", root / "a")  # the same files under another name; then the mixture's own pin goes
    v = add_mixture(reg, "pin", root / "ab")
    assert v.config["pinned"] == ["a@1", "b@1"]  # the same name is preferred
    r = httpx.delete(env["url"] + "/admin/adapters/a@1", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200
    with pytest.raises(openai.ConflictError, match="mix:pin@1 is pinned to adapter a@1, which is gone"):
        chat(env, "mix:pin")
    r = httpx.post(env["url"] + "/admin/adapters", json={"name": "pin", "path": str(root / "ab")},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 201 and r.json()["pinned"] == ["a2@1", "b@1"]  # re-pinned by content hash
    assert chat(env, "mix:pin") == offline(env, "mix")
