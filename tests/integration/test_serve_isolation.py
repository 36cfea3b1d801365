"""One request cannot hurt another inside the engine (no HTTP): stale NaN in a reused KV-cache row, a
row whose adapter slot holds NaN, a row whose decode raises, a receiver that raises, tiny temperatures.
Every victim's greedy output is compared with offline generation token for token."""
import math
import threading
import time
import types

import pytest
import torch

from lorakit import set_active
from lorakit.generate import generate_ids
from lorakit.serve.engine import GenRequest
from lorakit.serve.request import sample
from engine_helpers import Collect, offline, save_tiny_adapters, use

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_tiny_adapters(tmp_path_factory.mktemp("iso"))


@pytest.fixture
def eng(start_engine):
    return start_engine(max_slots=3)


def held(eng, *reqs):
    """Submit requests while the engine is held, so they are admitted (and decoded) together."""
    gate = threading.Event()
    eng.call(gate.wait)
    for r in reqs:
        eng.submit(r)
    gate.set()


def test_stale_nan_in_a_reused_cache_row_never_reaches_a_new_request(adapters, eng):
    root, ref = adapters
    first = Collect()
    eng.submit(GenRequest([5, 6, 7], [use(root, "a")], 3, sink=first))
    assert first.done.wait(30)
    # what a request that went NaN leaves behind: every row, every position of the cache
    eng.call(lambda: [t.fill_(math.nan) for t in eng.cache.k + eng.cache.v]).result(10)
    short, long_ = Collect(), Collect()  # different lengths: the short row masks positions the long one uses
    held(eng, GenRequest([9, 10], [use(root, "b")], 6, sink=short),
         GenRequest([5, 6, 7, 8, 9, 10, 11], [], 6, sink=long_))
    assert short.done.wait(30) and long_.done.wait(30)
    assert short.tokens == offline(ref, "b", [9, 10], 6)
    assert long_.tokens == offline(ref, None, [5, 6, 7, 8, 9, 10, 11], 6)


def test_a_row_with_nan_weights_fails_alone_and_its_row_is_clean_for_the_next(adapters, eng):
    root, ref = adapters
    warm = Collect()
    eng.submit(GenRequest([5, 6], [use(root, "c")], 1, sink=warm))
    assert warm.done.wait(30)

    def poison():  # a slot gone bad past every file check: NaN in every layer's B of adapter c
        slot = eng.bank.resident["c@1"]
        for ls in eng.bank.layers.values():
            ls.B[slot].fill_(math.nan)

    eng.call(poison).result(10)
    bad, victim = Collect(), Collect()
    held(eng, GenRequest([5, 6, 7], [use(root, "c")], 8, sink=bad),
         GenRequest([5, 6, 7, 8], [use(root, "a")], 8, sink=victim))
    assert bad.done.wait(30) and bad.end[0] == "error" and "non-finite logits" in bad.end[1]
    assert victim.done.wait(30) and victim.tokens == offline(ref, "a", [5, 6, 7, 8], 8)
    after = [Collect() for _ in range(3)]  # take every row again, the poisoned one included
    held(eng, *[GenRequest([9, 10 + i], [use(root, "b")] if i else [], 6, sink=c) for i, c in enumerate(after)])
    for i, c in enumerate(after):
        assert c.done.wait(30) and c.tokens == offline(ref, "b" if i else None, [9, 10 + i], 6)
    assert eng.stats["errors"] == 1


def test_a_row_whose_decode_raises_is_retired_alone(adapters, eng):
    root, ref = adapters
    started = {"bad": threading.Event(), "good": threading.Event()}

    def pace(which):  # keep both rows running while the fault is injected
        def on_token(k):
            if k >= 2:
                started[which].set()
            time.sleep(0.01)
        return on_token

    bad, good = Collect(on_token=pace("bad")), Collect(on_token=pace("good"))
    rb = GenRequest([5, 6], [use(root, "a")], 30, ignore_eos=True, sink=bad)
    held(eng, rb, GenRequest([7, 8, 9], [use(root, "b")], 30, ignore_eos=True, sink=good))
    assert started["bad"].wait(30) and started["good"].wait(30)  # both rows are decoding
    # a real fault in one row's decode: its next token is outside the embedding table
    eng.call(lambda: setattr(next(r for r in eng.running if r.req is rb), "next_token", 10 ** 6)).result(10)
    assert bad.done.wait(30) and bad.end[0] == "error" and "IndexError" in bad.end[1]
    assert good.done.wait(30) and good.end == ("done", "length")
    set_active(ref, "b")
    want = generate_ids(ref, types.SimpleNamespace(eos_token_id=None, pad_token_id=0), [[7, 8, 9]],
                        max_new_tokens=30)[0]
    set_active(ref, None)
    assert good.tokens == want[:30]


def test_a_receiver_that_raises_cancels_only_its_request(adapters, eng):
    root, ref = adapters
    victim = Collect()

    def broken(ev):
        raise RuntimeError("event loop is closed")

    held(eng, GenRequest([5, 6, 7], [use(root, "a")], 8, sink=broken),
         GenRequest([5, 6, 7], [use(root, "b")], 8, sink=victim))
    assert victim.done.wait(30) and victim.tokens == offline(ref, "b", [5, 6, 7], 8)
    deadline = time.monotonic() + 10
    while eng.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.running and eng.stats["cancelled"] >= 1


def test_tiny_and_large_temperatures(adapters, eng):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(500, generator=g) * 10
        assert sample(logits, 1e-45, 1.0, g) == int(logits.argmax())  # exp(-x/1e-45): finite, one-hot
        assert sample(logits, 5e-324, 1e-6, g) == int(logits.argmax())
        assert 0 <= sample(logits, 2.0, 1.0, g) < 500
    root, ref = adapters
    tiny_t, victim = Collect(), Collect()
    held(eng, GenRequest([5, 6, 7], [use(root, "a")], 8, temperature=1e-45, seed=3, sink=tiny_t),
         GenRequest([5, 6], [use(root, "b")], 8, sink=victim))
    assert tiny_t.done.wait(30) and tiny_t.tokens == offline(ref, "a", [5, 6, 7], 8)  # 1e-45 is greedy
    assert victim.done.wait(30) and victim.tokens == offline(ref, "b", [5, 6], 8)


@pytest.mark.parametrize("kw,msg", [
    (dict(adapters=["a", 10.5]), "stack weight"), (dict(adapters=["a", math.nan]), "stack weight"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature=-1e-9), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(prompt=[]), "prompt"),
])
def test_engine_refuses_out_of_range_requests(adapters, eng, kw, msg):
    root, _ = adapters
    if "adapters" in kw:
        kw = {**kw, "adapters": [use(root, kw["adapters"][0], kw["adapters"][1])]}
    with pytest.raises(ValueError, match=msg):
        eng.submit(GenRequest(**{"prompt": [5, 6], **kw}))
