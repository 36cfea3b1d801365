"""The static-cache engine (serve/fast.py) on the CPU, eager (no graphs): greedy output equal to offline `generate`
token for token in fp32 with rows of different lengths and different adapters decoded together and prompts
prefilled in chunks between decode steps; memory accounted and admission refused when every row is taken and the
queue is full; a cancelled request gives its cache row back; sampling depends on a row's own seed only."""
import threading

import pytest
import torch

from lorakit.models import tiny_llama
from lorakit.serve.decoder import cache_bytes
from lorakit.serve.engine import GenRequest
from lorakit.serve.fast import CacheFull, StaticEngine
from engine_helpers import TOK, Collect, offline, save_tiny_adapters, use


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_tiny_adapters(tmp_path_factory.mktemp("static"))


def run_all(eng, reqs, timeout=120):
    sinks = [Collect() for _ in reqs]
    gate = threading.Event()
    eng.call(gate.wait)  # hold the engine so every request is admitted in the same turn
    for r, s in zip(reqs, sinks):
        r.sink = s
        eng.submit(r)
    gate.set()
    for s in sinks:
        assert s.done.wait(timeout), "a request did not finish"
    return sinks


def test_greedy_equals_offline_mixed_adapters_chunked_prefill(adapters):
    root, ref = adapters
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 10, 11], [3] + list(range(20, 37)), [40, 41, 42, 43, 44, 45]]
    names = ["a", None, "b", "c"]  # the base between three adapters
    n = 12
    want = [offline(ref, name, p, n) for name, p in zip(names, prompts)]
    assert len({tuple(w) for w in want}) == 4
    eng = StaticEngine(tiny_llama(), TOK, max_slots=3, max_batch=4, max_len=64, prefill_chunk=7).start()
    try:
        reqs = [GenRequest(p, [use(root, name)] if name else [], max_tokens=n) for name, p in zip(names, prompts)]
        sinks = run_all(eng, reqs)
        info = eng.info()
    finally:
        eng.stop()
    assert [s.tokens for s in sinks] == want
    assert all(s.end == ("done", "length") for s in sinks)
    assert info["prefills"] > len(prompts)  # chunks of at most 7 tokens in all per turn: prompts took several turns
    assert info["max_rows"] == 4 and info["graphs"] == 0


def test_cache_accounted_and_admission_refused_when_full(adapters):
    model = tiny_llama()
    eng = StaticEngine(model, TOK, max_slots=1, max_batch=2, max_len=32, max_waiting=1)
    cfg = model.config
    # K and V, every layer, rows + the scratch row, 32 positions, kv heads x head size fp32 values
    assert eng.info()["kv_bytes"] == cache_bytes(cfg, 2, 32, torch.float32) == 2 * 2 * 3 * 32 * 2 * 16 * 4
    with pytest.raises(ValueError, match="rows hold 32 positions"):
        eng.submit(GenRequest(list(range(3, 35)), max_tokens=1))
    for _ in range(3):  # two rows taken and one waiting (the engine is not started: nothing moves)
        eng.submit(GenRequest([5, 6], max_tokens=4))
    eng.running = [object(), object()]  # both rows taken
    with pytest.raises(CacheFull, match="KV cache is full: all 2 rows are in use and 3 requests wait"):
        eng.submit(GenRequest([5, 6], max_tokens=4))
    eng.running = []
    eng.stop()


def test_cancel_frees_the_row_and_the_next_request_is_exact(adapters):
    root, ref = adapters
    eng = StaticEngine(tiny_llama(), TOK, max_slots=1, max_batch=1, max_len=64).start()
    try:
        first = GenRequest([5, 6, 7], [use(root, "a")], max_tokens=40, ignore_eos=True)
        first_sink = Collect(on_token=lambda k: first.cancel() if k == 3 else None)
        first.sink = first_sink
        eng.submit(first)
        assert first_sink.done.wait(60)
        assert first_sink.end == ("done", "cancelled") and len(first_sink.tokens) <= 4
        second = Collect()
        eng.submit(GenRequest([9, 10, 11, 12], [use(root, "b")], max_tokens=8, sink=second))
        assert second.done.wait(60)
        assert eng.call(lambda: (len(eng.running), list(eng.decoder.cache.free))).result(10) == (0, [0])
    finally:
        eng.stop()
    assert second.tokens == offline(ref, "b", [9, 10, 11, 12], 8)  # the row it reused held the cancelled one's K/V


def test_sampling_depends_on_the_rows_own_seed(adapters):
    root, _ = adapters

    def sample(seeds, others):
        eng = StaticEngine(tiny_llama(), TOK, max_slots=1, max_batch=4, max_len=64).start()
        try:
            reqs = [GenRequest([5, 6, 7], max_tokens=10, temperature=1.5, top_p=0.95, seed=s, ignore_eos=True)
                    for s in seeds]
            reqs += [GenRequest([8, 9], [use(root, "a")], max_tokens=6, ignore_eos=True) for _ in range(others)]
            return [s.tokens for s in run_all(eng, reqs)][: len(seeds)]
        finally:
            eng.stop()

    alone, crowded = sample([11, 12], 0), sample([11, 12], 2)
    assert alone == crowded  # other rows in the batch change nothing
    assert alone[0] != alone[1]  # seeds do


def _with_failing_captures(adapters, names, prompts, n, compiled_stand_in=False):
    """Run requests (adapter name or None, prompt) on a CPU engine that asks for graphs, with every capture raising
    at the named point `decoder.capture`; compiled_stand_in: the step is a wrapper of the plain one, as the compiled
    step is. -> (each request's tokens, offline generate's, the buckets tried, info(), the decoder)."""
    from lorakit import faults

    root, ref = adapters
    want = [offline(ref, name, p, n) for name, p in zip(names, prompts)]
    tried = []

    def fail(bucket):
        tried.append(bucket)
        raise RuntimeError("injected: capture failed")

    eng = StaticEngine(tiny_llama(), TOK, max_slots=3, max_batch=4, max_len=64, prefill_chunk=7, graphs=True)
    dec = eng.decoder
    assert dec.graphs  # the CPU engine asked for graphs: every decode step goes through a capture first
    if compiled_stand_in:
        dec._body = lambda rows: dec._decode_body(rows)
    with faults.hook("decoder.capture", fail):
        eng.start()
        try:
            sinks = run_all(eng, [GenRequest(p, [use(root, name)] if name else [], max_tokens=n)
                                  for name, p in zip(names, prompts)])
            info = eng.info()
        finally:
            eng.stop()
    return [s.tokens for s in sinks], want, tried, info, dec


def test_a_failed_graph_capture_runs_that_shape_eagerly_and_is_not_retried(adapters):
    """A capture that raises (injected at the named point `decoder.capture`, where the GPU engine captures a decode
    step) costs that batch shape its graph, not its tokens: greedy output still equals offline generate, each shape
    is tried once (not at every step), and info() counts the failures."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 10, 11], [40, 41, 42, 43, 44, 45]]
    got, want, tried, info, dec = _with_failing_captures(adapters, ["a", None, "b"], prompts, 10)
    assert got == want
    assert info["graphs"] == 0 and info["graph_failures"] == len(tried) == len(dec.uncapturable) >= 1
    assert info["decode_steps"] >= 10 - 1 > len(tried)  # one try per (bucket, stack) shape, not one per step
    assert info["compile_failures"] == 0


def test_a_compiled_step_that_fails_to_capture_is_given_up_for_the_plain_step(adapters):
    """LORAKIT_DECODE_COMPILE's step (stood in for here by a wrapper of the plain step) that raises at capture is
    dropped once for the plain step, which is tried at once for the same shape (and here fails too, as every
    capture on the CPU does): tokens still equal offline generate, the compiled step is given up once, not per
    shape."""
    got, want, tried, info, dec = _with_failing_captures(adapters, ["a", "b"], [[5, 6, 7, 8, 9, 10, 11], [9, 10, 11]],
                                                         6, compiled_stand_in=True)
    assert got == want
    assert dec._body == dec._decode_body and info["compile_failures"] == 1
    assert tried[0] == tried[1] and len(tried) == info["graph_failures"] + 1  # the same shape, plain, at once
