"""Long prompts and scoring run in chunks of engine.CHUNK positions that interleave with the decode steps of
others: a chunked prompt generates the tokens offline generation gives, a chunked scoring equals plain torch and
is the same alone or beside others (fixed chunk boundaries), and three long scorings do not hold back a short
request: it finishes while they are still under way."""
import threading

import torch

from lorakit import set_active
from lorakit.generate import generate_ids
from lorakit.serve.engine import CHUNK, GenRequest, ScoreRequest
from engine_helpers import TOK, Collect
from test_serve_score import adapters, direct, score, use  # noqa: F401 (adapters: the module's fixture)

g = torch.Generator().manual_seed(7)
LONG = torch.randint(3, 128, (5 * CHUNK + 7,), generator=g).tolist()  # six chunks, the last one partial
ANSWER = torch.randint(3, 128, (2 * CHUNK + 3,), generator=g).tolist()


def test_a_chunked_prompt_generates_what_offline_generation_gives(adapters, start_engine):  # noqa: F811
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    long, short = Collect(), Collect()
    eng.submit(GenRequest(LONG, [use(root, "a")], max_tokens=12, ignore_eos=True, sink=long))
    eng.submit(GenRequest([3, 4, 5], [use(root, "b")], max_tokens=12, ignore_eos=True, sink=short))
    assert long.done.wait(60) and short.done.wait(60)
    for name, prompt, got in (("a", LONG, long), ("b", [3, 4, 5], short)):
        set_active(ref, name)
        assert got.tokens == generate_ids(ref, TOK, [prompt], max_new_tokens=12)[0], name
    set_active(ref, None)


def test_chunked_scoring_equals_plain_torch_alone_or_beside_others(adapters, start_engine):  # noqa: F811
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    prompt = LONG[:CHUNK + 5]  # prompt + answer: 3 chunks plus a part, answer tokens in every chunk but the first
    kind, alone = score(eng, prompt, ANSWER, [use(root, "a")])
    assert kind == "score" and len(alone.kl) == len(ANSWER)
    kl, lp_a, lp_b = direct(ref, "a", prompt, ANSWER)
    assert torch.allclose(torch.tensor(alone.kl, dtype=torch.float64), kl, atol=1e-4, rtol=0)
    assert torch.allclose(torch.tensor(alone.logprobs, dtype=torch.float64), lp_a, atol=1e-4, rtol=0)
    assert torch.allclose(torch.tensor(alone.base_logprobs, dtype=torch.float64), lp_b, atol=1e-4, rtol=0)
    gen = Collect()
    eng.submit(GenRequest(LONG, [use(root, "b")], max_tokens=30, ignore_eos=True, sink=gen))
    kind, beside = score(eng, prompt, ANSWER, [use(root, "a")])
    assert kind == "score" and beside.kl == alone.kl and beside.logprobs == alone.logprobs
    assert gen.done.wait(60)


def test_long_scorings_do_not_hold_back_a_short_request(adapters, start_engine):  # noqa: F811
    """Three scorings of 7 chunks each are queued first; a 5-token request sent after them gets all its tokens
    before the first scoring is done (one engine turn runs one chunk of scoring, then a decode step)."""
    root, _ = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    gate, order, scores = Collect(), [], [Collect() for _ in range(3)]
    hold = threading.Event()
    eng.call(hold.wait)  # everything below is queued before the engine runs a turn
    for s in scores:
        def sink(ev, s=s):
            order.append("score")
            s(ev)
        eng.submit(ScoreRequest(LONG[:4 * CHUNK], LONG[4 * CHUNK: 7 * CHUNK], [use(root, "a")], sink=sink))

    def short_sink(ev):
        if ev[0] != "token":
            order.append("short")
        gate(ev)
    eng.submit(GenRequest([3, 4, 5], [use(root, "b")], max_tokens=5, ignore_eos=True, sink=short_sink))
    hold.set()
    assert gate.done.wait(60) and all(s.done.wait(120) for s in scores)
    assert len(gate.tokens) == 5 and order[0] == "short", order
