"""POST /v1/score on the embedded model through a real server (uvicorn on loopback, httpx): the per-token KL of
an adapter (and a stack) to the base over the answer the server generated equals a direct computation with the
model in plain torch; the base against itself is 0; the same key as the rest; bad requests are refused with the
field they name, and the server carries on."""
import httpx
import pytest
import torch

from lorakit import LoraConfig, add_adapter, delete_adapter, load_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import fingerprint
from lorakit.adapters.registry import Registry
from lorakit.config import ServeConfig
from lorakit.generate import encode_prompt
from lorakit.models import load_base
from lorakit.serve.app import ServerThread, build_app, make_state

pytestmark = pytest.mark.slow
KEY = "sk-score"
MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _adapter(model, path, targets, seed, std):
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=targets, init_lora_weights=False), "x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, std)
    save_adapter(model, path, "x", base_name="embedded")
    delete_adapter(model, "x")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-http")
    model, tok = load_base("embedded", dtype="float32", device="cpu")
    _adapter(model, root / "noisy", "all-linear", 3, 0.06)
    _adapter(model, root / "qv", ["q_proj", "v_proj"], 4, 0.1)
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="SmolLM2")
    reg.add("noisy", root / "noisy")
    reg.add("qv", root / "qv")
    cfg = ServeConfig(api_keys=[KEY], max_slots=2, max_batch=4, max_prompt_tokens=200, max_new_tokens=32)
    state = make_state(model, tok, reg, cfg, "SmolLM2")
    server = ServerThread(build_app(state)).start()
    ref, _ = load_base("embedded", dtype="float32", device="cpu")  # plain torch, a separate instance
    load_adapter(ref, root / "noisy", "noisy", activate=False)
    load_adapter(ref, root / "qv", "qv", activate=False)
    yield dict(url=server.url, tok=tok, ref=ref)
    server.stop()
    state.engine.stop()
    reg.close()


def post(env, path, body, key=KEY):
    return httpx.post(env["url"] + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def direct(ref, active, prompt, answer):
    ids = torch.tensor([prompt + answer[:-1]])
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
    with torch.no_grad():
        set_active(ref, active)
        la = torch.log_softmax(ref(ids).logits[0, rows].double(), -1)  # (n, vocab)
        set_active(ref, None)
        lb = torch.log_softmax(ref(ids).logits[0, rows].double(), -1)
    return (la.exp() * (la - lb)).sum(-1), la.gather(1, torch.tensor(answer)[:, None])[:, 0]


def test_score_equals_plain_torch_and_the_base_against_itself_is_zero(env):
    prompt = encode_prompt(env["tok"], MSGS)  # the chat template, as the server renders it for these adapters
    for model, active in (("noisy", "noisy"), ("noisy:0.7+qv:0.3", {"noisy": 0.7, "qv": 0.3})):
        gen = post(env, "/v1/chat/completions", {"model": model, "messages": MSGS, "max_tokens": 16,
                                                 "temperature": 0, "return_token_ids": True}).json()
        answer = gen["choices"][0]["token_ids"]
        r = post(env, "/v1/score", {"model": model, "messages": MSGS, "completion": answer})
        assert r.status_code == 200, r.text
        s = r.json()
        assert s["object"] == "score" and s["reference"] == "SmolLM2" and s["completion_token_ids"] == answer
        assert s["usage"]["prompt_tokens"] == len(prompt) and len(s["kl"]) == len(answer) > 3
        kl, lp = direct(env["ref"], active, prompt, answer)
        assert (torch.tensor(s["kl"], dtype=torch.float64) - kl).abs().max() < 1e-4, (s["kl"], kl.tolist())
        assert (torch.tensor(s["logprobs"], dtype=torch.float64) - lp).abs().max() < 1e-4
        assert max(s["kl"]) > 0.05 and s["kl_max"] == max(s["kl"])
        assert abs(s["kl_mean"] - sum(s["kl"]) / len(s["kl"])) < 1e-9
    base = post(env, "/v1/score", {"model": "base", "messages": MSGS, "completion": answer}).json()
    assert base["kl"] == [0.0] * len(answer) and base["logprobs"] == base["base_logprobs"]
    text = post(env, "/v1/score", {"model": "noisy", "prompt": "The sky is", "completion": " blue today"}).json()
    assert text["completion_token_ids"] == env["tok"](" blue today", add_special_tokens=False)["input_ids"]
    assert len(text["kl"]) == len(text["completion_token_ids"]) and text["usage"]["prompt_tokens"] == 3


def test_score_needs_the_key_and_refuses_bad_requests(env):
    assert post(env, "/v1/score", {"model": "noisy", "messages": MSGS, "completion": [1, 2]},
                key="sk-wrong").status_code == 401
    for body, status, param in (
            ({"model": "noisy", "messages": MSGS}, 400, "completion"),
            ({"model": "noisy", "messages": MSGS, "completion": []}, 400, "completion"),
            ({"model": "noisy", "messages": MSGS, "completion": [1, 10 ** 7]}, 400, "completion"),
            ({"model": "noisy", "messages": MSGS, "completion": [1] * 201}, 400, "completion"),
            ({"model": "noisy", "completion": [1]}, 400, "messages"),
            ({"model": "noisy", "messages": MSGS, "prompt": "x", "completion": [1]}, 400, "messages"),
            ({"model": "nope", "messages": MSGS, "completion": [1]}, 404, "model"),
            ({"model": "noisy:99", "messages": MSGS, "completion": [1]}, 400, "model")):
        r = post(env, "/v1/score", body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    ok = post(env, "/v1/score", {"model": "qv", "messages": MSGS, "completion": [28, 29]})
    assert ok.status_code == 200 and len(ok.json()["kl"]) == 2  # the server carries on
