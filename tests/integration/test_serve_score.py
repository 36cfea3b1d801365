"""Scoring through the engine (serve/score.py): per answer token KL(adapter || base) and both log-probs equal a
direct computation with the model in plain torch; the base against itself is 0; a bad scoring request fails
alone while generation carries on."""
import math

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import read_adapter
from lorakit.generate import generate_ids
from lorakit.models import tiny_llama
from lorakit.serve.engine import AdapterUse, GenRequest, ScoreRequest
from engine_helpers import TOK, Collect, use

PROMPT, ANSWER = [5, 6, 7, 8, 9], [11, 3, 40, 17, 17, 2, 60, 8]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    m = tiny_llama()
    for i, n in enumerate("ab"):
        torch.manual_seed(10 + i)
        add_adapter(m, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False), n)
        with torch.no_grad():  # large enough B that the adapters move the distribution visibly
            for name, p in m.named_parameters():
                if name.endswith(f".adapters.{n}.lora_B"):
                    p.normal_(0, 1.0)
        save_adapter(m, root / n, n)
    return root, m


def direct(model, active, prompt, answer):
    """Plain torch: the model's own forward (transformers), with and without the adapter -> (kl, lp_a, lp_b)."""
    ids = torch.tensor([prompt + answer[:-1]])
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
    with torch.no_grad():
        set_active(model, active)
        la = torch.log_softmax(model(ids).logits[0, rows].double(), -1)  # (n, vocab)
        set_active(model, None)
        lb = torch.log_softmax(model(ids).logits[0, rows].double(), -1)
    t = torch.tensor(answer)[:, None]
    return (la.exp() * (la - lb)).sum(-1), la.gather(1, t)[:, 0], lb.gather(1, t)[:, 0]


def score(eng, prompt, answer, uses, timeout=60):
    r = Collect()
    eng.submit(ScoreRequest(prompt, answer, uses, sink=r))
    assert r.done.wait(timeout)
    return r.end


def test_kl_equals_plain_torch_and_base_against_itself_is_zero(adapters, start_engine):
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    for active, uses in (("a", [use(root, "a")]), ({"a": 0.7, "b": 0.3}, [use(root, "a", 0.7), use(root, "b", 0.3)])):
        kind, s = score(eng, PROMPT, ANSWER, uses)
        assert kind == "score", s
        kl, lp_a, lp_b = direct(ref, active, PROMPT, ANSWER)
        assert len(s.kl) == len(ANSWER) and min(s.kl) > 0.01  # the adapter moves every distribution (a tiny model: near uniform)
        assert torch.allclose(torch.tensor(s.kl, dtype=torch.float64), kl, atol=1e-4, rtol=0), (s.kl, kl)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), lp_a, atol=1e-4, rtol=0)
        assert torch.allclose(torch.tensor(s.base_logprobs, dtype=torch.float64), lp_b, atol=1e-4, rtol=0)
        assert s.summary()["max"] == max(s.kl) and abs(s.summary()["mean"] - sum(s.kl) / len(s.kl)) < 1e-12
    kind, s = score(eng, PROMPT, ANSWER, [])
    assert kind == "score" and s.kl == [0.0] * len(ANSWER) and s.logprobs == s.base_logprobs
    assert eng.stats["scores"] == 3 and eng.info()["scoring"] == 0


def test_scoring_between_decode_steps_leaves_generation_alone(adapters, start_engine):
    """A scoring request submitted while a row decodes with another adapter runs between its steps (not
    after it finishes) and changes none of its tokens; its own numbers are those it gets alone."""
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    alone = score(eng, PROMPT, ANSWER, [use(root, "a")])[1]
    gen, at = Collect(), []

    def scored(ev):  # engine thread: how far the generation had got when the score came
        at.append((ev, len(gen.tokens)))

    def on_token(ev):
        gen(ev)
        if ev[0] == "token" and len(gen.tokens) == 3:
            eng.submit(ScoreRequest(PROMPT, ANSWER, [use(root, "a")], sink=scored))
    eng.submit(GenRequest([3, 4, 5], [use(root, "b")], max_tokens=40, ignore_eos=True, sink=on_token))
    assert gen.done.wait(60) and gen.end == ("done", "length")
    (ev, n), = at
    assert ev[0] == "score" and ev[1].kl == alone.kl and 3 <= n < 40  # between the row's steps
    set_active(ref, "b")
    want = generate_ids(ref, TOK, [[3, 4, 5]], max_new_tokens=40)[0]
    set_active(ref, None)
    assert gen.tokens[:len(want)] == want and len(gen.tokens) == 40


def test_a_bad_scoring_request_fails_alone(adapters, tmp_path, start_engine):
    """Refused at submit: an empty answer, ids outside the vocabulary, prompt + answer beyond the context, a
    bad stack weight. Failing on the engine: an unreadable adapter, a resident adapter gone NaN. The
    generation running beside them gets every token it would get alone."""
    root, ref = adapters
    (tmp_path / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    eng = start_engine(max_slots=2, max_batch=4)
    for prompt, answer, match in (([5, 6], [], "answer must be a non-empty"), ([5, 6], [1, 10 ** 6], "below 128"),
                                  ([], [3], "prompt must be"), ([1] * 300, [1] * 300, "context")):
        with pytest.raises(ValueError, match=match):
            eng.submit(ScoreRequest(prompt, answer, []))
    with pytest.raises(ValueError, match="stack weight"):
        eng.submit(ScoreRequest(PROMPT, ANSWER, [use(root, "a", float("nan"))]))
    gen = Collect()
    eng.submit(GenRequest([3, 4, 5], [use(root, "a")], max_tokens=30, ignore_eos=True, sink=gen))
    kind, msg = score(eng, PROMPT, ANSWER, [AdapterUse("broken@1", lambda: read_adapter(tmp_path))])
    assert kind == "error" and "could not be loaded" in msg and "broken@1" not in eng.bank.resident
    assert score(eng, PROMPT, ANSWER, [use(root, "b")])[0] == "score"

    def poison():  # a slot gone bad past every file check: NaN in every layer's B of adapter b
        for ls in eng.bank.layers.values():
            ls.B[eng.bank.resident["b@1"]].fill_(math.nan)
    eng.call(poison).result(10)
    kind, msg = score(eng, PROMPT, ANSWER, [use(root, "b")])
    assert kind == "error" and "the adapter's logits are not finite" in msg, msg
    assert eng.unload(["b@1"]).result(10) == ["b@1"]
    assert gen.done.wait(60) and gen.end == ("done", "length")
    set_active(ref, "a")
    assert gen.tokens == generate_ids(ref, TOK, [[3, 4, 5]], max_new_tokens=30)[0][:30]
    set_active(ref, None)
    kind, s = score(eng, PROMPT, ANSWER, [use(root, "a")])  # the engine scores on afterwards
    assert kind == "score" and len(s.kl) == len(ANSWER)
    assert eng.stats["errors"] == 2 and not eng.scoring
