"""The real server (uvicorn on loopback) driven by the real `openai` client, on a tiny random Llama
that uses the embedded model's tokenizer: concurrency, streaming, stacks, versions, errors."""
import time

import httpx
import openai
import pytest
import torch

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import WEIGHTS_NAME, fingerprint
from lorakit.config import ServeConfig
from lorakit.generate import encode_prompt, generate_ids
from lorakit.models import load_base, tiny_llama
from lorakit.serve.app import ServerThread, build_app, make_state
from lorakit.adapters.registry import Registry
from serve_helpers import save_noisy_adapter, tiny_base, together

KEY, ADMIN = "sk-test-inference", "sk-test-admin"
MSGS = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module", params=["plain", "static"])
def env(tmp_path_factory, request):
    """The server with either engine: the plain one (the CPU's) and the static-cache one (CUDA's), here eager."""
    root = tmp_path_factory.mktemp("serve")
    tiny_base(root)
    model, tok = load_base(str(root / "base"), device="cpu")
    qv = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False)
    save_noisy_adapter(model, root / "a", qv, 1)
    save_noisy_adapter(model, root / "a2", qv, 2)
    save_noisy_adapter(model, root / "b", LoraConfig(r=8, alpha=8, targets="all-linear", init_lora_weights=False), 3)
    save_noisy_adapter(model, root / "c", qv, 4)
    wide = tiny_llama(hidden=32)
    add_adapter(wide, qv)
    save_adapter(wide, root / "wide")
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="tiny")
    for n in "abc":
        reg.add(n, root / n)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ServeConfig(api_keys=[KEY], admin_key=ADMIN, max_slots=2, max_batch=8, max_body_bytes=20_000,
                      max_prompt_tokens=100, max_new_tokens=64)
    state = make_state(model, tok, reg, cfg, "tiny", static=request.param == "static")
    server = ServerThread(build_app(state)).start()
    ref_model, _ = load_base(str(root / "base"), device="cpu")  # offline reference, separate instance
    for n in ("a", "a2", "b"):
        load_adapter(ref_model, root / n, n)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield dict(root=root, tok=tok, model=model, state=state, url=server.url, client=client, ref=ref_model,
               base_state=base_state)
    server.stop()
    state.engine.stop()
    reg.close()


def offline(env, use, prompt=MSGS, n=12):
    set_active(env["ref"], use)
    return generate_ids(env["ref"], env["tok"], [encode_prompt(env["tok"], prompt)], max_new_tokens=n)[0]


def chat(env, model, n=12, **kw):
    r = env["client"].chat.completions.create(model=model, messages=MSGS, max_tokens=n, temperature=0,
                                              extra_body={"return_token_ids": True}, **kw)
    return r.choices[0].model_extra["token_ids"], r


def admin(env, method, path, **kw):
    return httpx.request(method, env["url"] + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw)


def test_models_and_health(env):
    ids = [m.id for m in env["client"].models.list().data]
    assert ids[0] == "tiny" and {"a", "a@1", "b", "b@1", "c"} <= set(ids)
    h = httpx.get(env["url"] + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"


def test_concurrent_adapters_and_stack_match_offline(env):
    uses = {"tiny": None, "a": "a", "b": "b", "a:0.5+b:-0.7": {"a": 0.5, "b": -0.7}}
    want = {m: offline(env, u) for m, u in uses.items()}
    assert len({tuple(w) for w in want.values()}) == 4  # the adapters really differ
    got, rows = together(env, [lambda m=m: chat(env, m)[0] for m in uses])
    assert rows == 4  # all four requests decoded in the same steps
    assert dict(zip(uses, got)) == want


def test_streaming_matches_non_streaming(env):
    ids, full = chat(env, "b", n=16)
    stream = env["client"].chat.completions.create(model="b", messages=MSGS, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == env["tok"].decode(ids, skip_special_tokens=True)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids) == full.usage.completion_tokens
    prompt = "The quick brown fox"
    s = env["client"].completions.create(model="a", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in s)
    r = env["client"].completions.create(model="a", prompt=prompt, max_tokens=10, temperature=0)
    assert streamed == r.choices[0].text and r.usage.completion_tokens == 10
    assert r.choices[0].text == env["tok"].decode(offline(env, "a", prompt, 10), skip_special_tokens=True)


def test_stop_string_truncates(env):
    ids, full = chat(env, "a", n=12)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    _, r = chat(env, "a", n=12, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_versions_and_rollback_over_admin_api(env):
    r = admin(env, "POST", "/admin/adapters", json={"name": "a", "path": str(env["root"] / "a2")})
    assert r.status_code == 201 and r.json()["version"] == 2
    assert chat(env, "a")[0] == offline(env, "a2")  # the new version is current
    assert chat(env, "a@1")[0] == offline(env, "a")  # the old one is still addressable
    r = admin(env, "POST", "/admin/adapters/a/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1
    assert chat(env, "a")[0] == offline(env, "a")
    assert admin(env, "GET", "/admin/adapters/a").json()["current_version"] == 1
    assert admin(env, "POST", "/admin/adapters/a/rollback", json={"version": 9}).status_code == 404
    r = admin(env, "DELETE", "/admin/adapters/a@2")
    assert r.status_code == 200 and r.json()["removed"] == ["a@2"]
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'a@2'"):
        chat(env, "a@2")


def test_lru_unloads_without_touching_the_base(env):
    for m in ("a", "b", "c", "a"):
        chat(env, m, n=2)
    eng = env["state"].engine
    assert eng.info()["resident"] == ["c@1", "a@1"] and eng.bank.max_slots == 2
    for k, v in env["model"].state_dict().items():
        assert torch.equal(v, env["base_state"][k]), k
    assert chat(env, "tiny")[0] == offline(env, None)


def test_errors_are_reported_and_server_keeps_serving(env):
    url, h = env["url"], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "a", "messages": [', headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"[1, 2]", headers=h)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        chat(env, "nope")
    bad_key = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="a", messages=MSGS, max_tokens=2)
    assert httpx.get(url + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(url + "/admin/adapters", headers=h).status_code == 401  # inference key is not admin
    r = admin(env, "POST", "/admin/adapters", json={"name": "wide", "path": str(env["root"] / "wide")})
    assert r.status_code == 409 and "another base" in r.json()["error"]["message"]
    for name in ("../../etc/passwd", "/abs", "a/b"):
        r = admin(env, "POST", "/admin/adapters", json={"name": name, "path": str(env["root"] / "a")})
        assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="invalid adapter name"):
            chat(env, name)
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "a", "prompt": "x" * 30_000})
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError, match="at most 100"):
        env["client"].completions.create(model="a", prompt="word " * 150, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(env, "a", n=65)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        env["client"].completions.create(model="a", prompt=[5, 49152], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 2 in memory"):
        chat(env, "a+b+c")
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        env["client"].chat.completions.create(model="a", messages=MSGS, n=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        env["client"].chat.completions.create(model="a", messages=[{"role": "wizard", "content": "x"}])
    assert httpx.get(url + "/v1/nothing-here", headers=h).json()["error"]["code"] == "http_error"
    assert chat(env, "b", n=4)[0] == offline(env, "b", n=4)  # still serving, still right


def test_corrupt_adapter_file_fails_only_its_requests(env):
    reg = env["state"].registry
    env["state"].engine.unload([reg.resolve("c").sha256]).result(10)
    stored = reg.resolve("c").path / WEIGHTS_NAME
    stored.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(openai.InternalServerError, match="could not be loaded"):
        chat(env, "c")
    assert chat(env, "b", n=4)[0] == offline(env, "b", n=4)
    assert [v.name for v in reg.list()] == ["a", "b", "c"]
    assert httpx.get(env["url"] + "/health").json()["status"] == "ok"
    assert stored.read_bytes() == b"\x00garbage" * 10  # a failed load changes nothing on disk


def test_lorakit_serve_command(env, tmp_path):
    """`python -m lorakit serve` end to end: registers an adapters dir at start, answers the openai client."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    adapters = tmp_path / "adapters"
    for n in ("a", "b"):
        shutil.copytree(env["root"] / n, adapters / n)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(env["root"] / "base"), "--registry",
           str(tmp_path / "r.sqlite"), "--adapters", str(adapters), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": src, "LORAKIT_API_KEYS": "cli-key"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "base"  # a model dir is named by its directory
        r = client.chat.completions.create(model="b", messages=MSGS, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == offline(env, "b", n=6)
        assert httpx.get(url + "/admin/adapters").status_code == 403  # no --admin-key: admin API off
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "adapters: a@1, b@1" in out


def test_chat_request_rendered_as_the_adapter_was_trained(env):
    """An adapter trained on plain-rendered rows (recorded in its metadata) gets a single user turn as its
    text, as `lorakit generate` renders it by default; a chat-recorded one gets the chat template."""
    from lorakit.templates import template_info

    model, tok = load_base(str(env["root"] / "base"), device="cpu")
    torch.manual_seed(5)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False), "x")
    for how in ("plain", "chat"):
        save_adapter(model, env["root"] / how, "x", metadata=template_info(tok, how))
        env["state"].registry.add(f"t{how}", env["root"] / how)
    text = MSGS[0]["content"]
    want_plain = generate_ids(model, tok, [encode_prompt(tok, text)], max_new_tokens=8)[0]
    want_chat = generate_ids(model, tok, [encode_prompt(tok, MSGS)], max_new_tokens=8)[0]
    assert want_plain != want_chat
    assert chat(env, "tplain", n=8)[0] == want_plain
    assert chat(env, "tchat", n=8)[0] == want_chat
