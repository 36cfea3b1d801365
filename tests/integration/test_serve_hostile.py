"""A live server (uvicorn on loopback, a tiny random Llama with the embedded tokenizer) under hostile
bodies while victims run: wrong types, unicode, deep nesting, huge and tiny numbers, NaN/inf in every
numeric field and in stack weights, poisoned adapter files over the admin API. Every hostile request gets
a 4xx (or a proper 200), never a 500; every victim's greedy output is unchanged token for token; the
engine records no failed row; the server stays up. Also: a non-streaming request is cancelled when its
client disconnects."""
import json
import math
import random
import shutil
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint
from lorakit.adapters.registry import Registry
from lorakit.config import ServeConfig
from lorakit.models import load_base, tiny_llama
from lorakit.serve.app import ServerThread, build_app, cpu_threads, make_state
from serve_helpers import save_noisy_adapter, tiny_base

pytestmark = pytest.mark.slow
KEY, ADMIN = "sk-hostile", "sk-hostile-admin"
H = {"Authorization": f"Bearer {KEY}"}
HA = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())  # what `lorakit serve` picks: 2 spin-waiting threads on a busy
    root = tmp_path_factory.mktemp("hostile")  # 2-core machine made every decode step ~50x slower here
    tiny_base(root, hidden=128, layers=4, max_positions=1024)
    model, tok = load_base(str(root / "base"), device="cpu")
    qv = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False)
    save_noisy_adapter(model, root / "a", qv, 1)
    save_noisy_adapter(model, root / "b", LoraConfig(r=8, alpha=8, targets="all-linear", init_lora_weights=False), 2)
    save_noisy_adapter(model, root / "c", qv, 3)
    save_noisy_adapter(model, root / "d", qv, 4)  # registered by a test, under another name
    _poison(root)
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="tiny")
    for n in "abc":
        reg.add(n, root / n)
    cfg = ServeConfig(api_keys=[KEY], admin_key=ADMIN, max_slots=3, max_batch=8, max_body_bytes=200_000,
                      max_prompt_tokens=200, max_new_tokens=600)
    state = make_state(model, tok, reg, cfg, "tiny")
    server = ServerThread(build_app(state)).start()
    yield dict(root=root, state=state, url=server.url, tok=tok)
    server.stop()
    state.engine.stop()
    reg.close()
    torch.set_num_threads(threads)


def _poison(root):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    for name, edit in {
        "nan": lambda t: t[q + ".lora_B.weight"].fill_(math.nan),
        "inf": lambda t: t[q + ".lora_A.weight"].fill_(math.inf),
        "rank": lambda t: t.__setitem__(q + ".lora_A.weight", t[q + ".lora_A.weight"][:3].contiguous()),
    }.items():
        shutil.copytree(root / "a", root / f"poison-{name}")
        t = load_file(root / "a" / WEIGHTS_NAME)
        edit(t)
        save_file(t, str(root / f"poison-{name}" / WEIGHTS_NAME))
    shutil.copytree(root / "a", root / "poison-alpha")
    cfg = json.loads((root / "a" / CONFIG_NAME).read_text())
    (root / "poison-alpha" / CONFIG_NAME).write_text(json.dumps({**cfg, "lora_alpha": math.nan}))
    raw = (root / "a" / WEIGHTS_NAME).read_bytes()
    shutil.copytree(root / "a", root / "poison-truncated")
    (root / "poison-truncated" / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 3])
    wide = tiny_llama(hidden=32)
    add_adapter(wide, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    save_adapter(wide, root / "poison-wrongbase")


# ---------------------------------------------------------------- hostile bodies
def _nested(depth, leaf=1):
    for _ in range(depth):
        leaf = {"x": [leaf]}
    return leaf


WEIRD = [None, True, False, 0, -1, 1, 2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 40, 1e-45, 5e-324, -0.0, 1e308, -1e308,
         math.nan, math.inf, -math.inf, "", "a", "NaN", "1e999", "false", "\x00", "\ud800", "\U0001f642" * 40,
         "\u202e\u0301" * 20, "é" * 300, [], [1], [[1]], ["x"] * 6, {}, {"a": 1}, _nested(60), [math.nan]]
MODELS = ["a@1", "b", "tiny", "base", "a:0.5+b:-0.5", "a:10+b:-10", "a:3e38", "a:1e39", "a:NaN", "a:inf", "a:-inf",
          "a:1e-45", "a:-0", "a:10.0001", "a:1e308+b:1e308", "a@0", "a@99999999999999999999999", "a:", ":1",
          "a++b", "a:1:2", "../a", "a" * 300, "ä", "a\x00", "a+b+c+a", "a+b+c", "nope", "a@1:0.3+c:0.7"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "n", "return_token_ids", "ignore_eos", "logprobs", "presence_penalty",
          "frequency_penalty", "tools", "echo", "suffix", "user"]


def _value(rng, field):
    if field == "model" and rng.random() < 0.7:
        return rng.choice(MODELS)
    if field == "messages" and rng.random() < 0.6:
        w = rng.choice(WEIRD)
        return rng.choice([[{"role": "user", "content": w}], [{"role": w, "content": "hi"}],
                           [{"role": "user", "content": [{"type": "text", "text": w}]}], [w],
                           [{"role": "user", "content": "hi"}] * 50])
    if field in ("temperature", "top_p") and rng.random() < 0.5:
        return rng.choice([1e-45, 5e-324, 1e-300, 2.0, 2.0000001, 1e-6, 0])
    if field == "stop" and rng.random() < 0.5:
        return rng.choice([["\ud800"], ["", "x"], ["a"] * 5, "\U0001f642", ["\x00"]])
    return rng.choice(WEIRD)


def hostile_bodies(seed=0, n=100):
    """(path, raw body) pairs: every field set to every weird value, random mutations of valid requests,
    then raw byte-level attacks and admin bodies."""
    rng = random.Random(seed)
    out = []
    for f in FIELDS:
        for v in WEIRD + (MODELS if f == "model" else []):
            if f in ("max_tokens", "max_completion_tokens") and v is None:
                continue  # the default length: long, and valid
            body = {"model": "a@1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, f: v}
            out.append(("/v1/chat/completions", json.dumps(body).encode()))
    for _ in range(n):
        kind = rng.choice(["chat", "chat", "completion"])
        body = {"model": rng.choice(["a@1", "b", "tiny", "a:0.5+b:-0.5"]), "max_tokens": rng.choice([1, 3, 6])}
        body.update({"messages": [{"role": "user", "content": "Hi"}]} if kind == "chat" else {"prompt": "Once"})
        for f in rng.sample(FIELDS, rng.choice([1, 1, 2, 3])):
            if f == "max_tokens" or f == "max_completion_tokens":
                body[f] = rng.choice([v for v in WEIRD if v is not None])  # never the (long) default length
            else:
                body[f] = _value(rng, f)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        out.append((path, json.dumps(body).encode()))  # NaN/Infinity go out as those bare words
    base = b'{"model": "a@1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
    for raw in [b"[" * 5000 + b"]" * 5000, b'{"model":' * 3000 + b"1" + b"}" * 3000, b"[" * 150_000,
                base + b', "seed": ' + b"9" * 6000 + b"}", base + b', "temperature": 1e999}',
                base + b', "temperature": NaN}', base + b', "top_p": -Infinity}', b"\xff\xfe\x00{", b"", b"null",
                b'"str"', b"{" + b" " * 100 + b"}", base + b"}" + b"garbage", base.replace(b"Hi", b"\\ud800") + b"}",
                base.replace(b"Hi", b"\\u0000") + b"}", b'{"model": "a", "messages": "' + b"x" * 210_000 + b'"}']:
        out.append(("/v1/chat/completions", raw))
    for body in [{"name": "a", "path": "/nope", "force": "false"}, {"name": "x", "path": 5},
                 {"name": "\ud800", "path": "."}, {"name": ["a"], "path": "."}, {"name": "z", "path": "/etc"},
                 {"name": "z", "path": ".", "description": {"a": 1}}]:
        out.append(("/admin/adapters", json.dumps(body).encode()))
    return out


def _check(r, path):
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], r.text[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text[:300]


VICTIMS = [("a@1", [{"role": "user", "content": "Name a colour."}]),
           ("a:0.7+b:-0.4", [{"role": "user", "content": "Count to five, slowly and with care."}]),
           ("tiny", [{"role": "user", "content": "Hello"}])]


def _victim(url, i):
    model, msgs = VICTIMS[i % len(VICTIMS)]
    r = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": model, "messages": msgs, "max_tokens": 12, "temperature": 0,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_hostile_bodies_leave_victims_untouched(srv):
    url, eng = srv["url"], srv["state"].engine
    want = [_victim(url, i) for i in range(len(VICTIMS))]  # alone, before anything hostile
    assert len({tuple(w) for w in want}) == len(VICTIMS)
    errors0 = eng.stats["errors"]
    stop, got, failures = threading.Event(), [], []

    def victims():
        i = 0
        while not stop.is_set() or i < 6:
            try:
                got.append((i % len(VICTIMS), _victim(url, i)))
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(repr(e))
            i += 1

    t = threading.Thread(target=victims)
    t.start()
    codes = {}
    try:
        with httpx.Client(timeout=60) as c:
            for path, raw in hostile_bodies():
                headers = HA if path.startswith("/admin") else H
                r = c.post(url + path, content=raw, headers={**headers, "content-type": "application/json"})
                _check(r, path)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
    finally:
        stop.set()
        t.join(120)
    assert not failures, failures[:3]
    assert len(got) >= 6 and all(ids == want[k] for k, ids in got)
    assert codes.get(200, 0) >= 5 and codes.get(400, 0) >= 50, codes  # both kinds were really exercised
    assert eng.stats["errors"] == errors0  # no row failed
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("name,status,msg", [
    ("nan", 400, "non-finite"), ("inf", 400, "non-finite"), ("rank", 400, "same rank"), ("alpha", 400, "alpha"),
    ("truncated", 400, "not a readable safetensors"), ("wrongbase", 409, "another base")])
def test_poisoned_files_over_the_admin_api(srv, name, status, msg):
    r = httpx.post(srv["url"] + "/admin/adapters", headers=HA, timeout=30,
                   json={"name": f"p-{name}", "path": str(srv["root"] / f"poison-{name}"), "force": True})
    assert r.status_code == status and msg in r.json()["error"]["message"], r.text
    assert f"p-{name}" not in [v.name for v in srv["state"].registry.list()]


def test_a_stored_file_poisoned_after_registration_fails_only_its_requests(srv):
    reg, eng, url = srv["state"].registry, srv["state"].engine, srv["url"]
    want = _victim(url, 0)
    v = reg.add("late", srv["root"] / "d")  # content no resident slot holds (slots are keyed by content)
    shutil.copyfile(srv["root"] / "poison-nan" / WEIGHTS_NAME, v.path / WEIGHTS_NAME)  # tampered on disk
    r = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": "late", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
    assert _victim(url, 0) == want and "late@1" not in eng.info()["resident"]


def test_force_must_be_a_boolean_and_names_never_reuse_a_version(srv):
    url, reg = srv["url"], srv["state"].registry
    r = httpx.post(url + "/admin/adapters", headers=HA, json={"name": "re", "path": str(srv["root"] / "a"),
                                                              "force": "false"})
    assert r.status_code == 400 and "'force' must be true or false" in r.json()["error"]["message"]
    body = {"model": "re", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
            "temperature": 0, "return_token_ids": True}
    ids = {}
    for src in ("a", "b"):  # add, serve, remove the whole name, re-add other files under the same name
        r = httpx.post(url + "/admin/adapters", headers=HA, json={"name": "re", "path": str(srv["root"] / src)})
        assert r.status_code == 201
        ids[src] = (r.json()["version"], httpx.post(url + "/v1/chat/completions", headers=H, json=body,
                                                    timeout=60).json()["choices"][0]["token_ids"])
        assert httpx.delete(url + "/admin/adapters/re", headers=HA).status_code == 200
    assert ids["a"][0] == 1 and ids["b"][0] == 2  # never version 1 again
    assert ids["b"][1] == _victim_like(url, "b", body) != ids["a"][1]  # b's weights, not a's stale ones
    assert reg.versions("re") == []


def _victim_like(url, model, body):
    r = httpx.post(url + "/v1/chat/completions", headers=H, json={**body, "model": model}, timeout=60)
    return r.json()["choices"][0]["token_ids"]


def test_non_streaming_request_is_cancelled_when_the_client_goes_away(srv):
    url, eng = srv["url"], srv["state"].engine
    tokens0, cancelled0 = eng.stats["tokens"], eng.stats["cancelled"]
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", headers=H, timeout=httpx.Timeout(60, read=0.5),
                   json={"model": "b", "prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True,
                         "temperature": 0})
    deadline = time.monotonic() + 20
    while (eng.running or eng.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = time.monotonic() - t0
    made = eng.stats["tokens"] - tokens0
    assert not eng.running and eng.stats["cancelled"] == cancelled0 + 1
    assert 0 < made < 600, f"{made} tokens decoded for nobody in {gone:.1f} s"  # stopped mid-decode
    print(f"cancelled after {made} of 600 tokens, {gone:.2f} s after the request was sent")
