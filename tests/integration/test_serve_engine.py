"""The continuous-batching engine without HTTP: joining mid-flight, slot pressure, cancellation, errors."""
import threading
import time

import pytest

from lorakit.adapters.peft_files import read_adapter
from lorakit.serve.engine import AdapterUse, Engine, GenRequest
from engine_helpers import TOK, Collect, offline, save_tiny_adapters, use

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_tiny_adapters(tmp_path_factory.mktemp("eng"))


def test_new_request_joins_running_batch(adapters, start_engine):
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    late = Collect()
    pa, pb = [5, 6, 7, 8], [9, 10, 11]

    def join_after(k):
        if k == 5:  # A is mid-decode: B is submitted now and must join the running batch
            eng.submit(GenRequest(pb, [use(root, "b")], max_tokens=6, sink=late))

    early = Collect(on_token=join_after)
    eng.submit(GenRequest(pa, [use(root, "a")], max_tokens=40, sink=early))
    assert early.done.wait(60) and late.done.wait(60)
    assert early.tokens == offline(ref, "a", pa, 40) and len(early.tokens) == 40
    assert late.tokens == offline(ref, "b", pb, 6)
    assert eng.stats["max_rows"] == 2  # they shared decode steps
    assert eng.stats["decode_steps"] < 40 + 6  # not one after the other


def test_waits_for_a_slot_then_runs_and_cancel_frees_it(adapters, start_engine):
    root, ref = adapters
    eng = start_engine(max_slots=1, max_batch=4)
    started = threading.Event()
    def pace(k):  # the hog decodes at most ~100 tokens/s so that it is still running when `other` arrives
        started.set()
        time.sleep(0.01)

    hog = Collect(on_token=pace)
    req = eng.submit(GenRequest([5, 6, 7], [use(root, "a")], max_tokens=200, ignore_eos=True, sink=hog))
    assert started.wait(30)
    other = Collect()
    eng.submit(GenRequest([9, 10], [use(root, "b")], max_tokens=5, sink=other))
    assert not other.done.wait(0.3) and len(eng.waiting) == 1  # its adapter has no free slot yet
    req.cancel()
    assert hog.done.wait(30) and hog.end == ("done", "cancelled")
    assert other.done.wait(30) and other.tokens == offline(ref, "b", [9, 10], 5)
    assert list(eng.bank.resident) == ["b@1"]


def test_broken_adapter_or_prompt_fails_its_request_only(adapters, tmp_path, start_engine):
    root, ref = adapters
    (tmp_path / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    eng = start_engine(max_slots=2, max_batch=4)
    bad, good = Collect(), Collect()
    eng.submit(GenRequest([5, 6], [AdapterUse("broken@1", lambda: read_adapter(tmp_path))], 4, sink=bad))
    eng.submit(GenRequest([5, 6], [use(root, "c")], 4, sink=good))
    assert bad.done.wait(30) and bad.end[0] == "error" and "not a readable safetensors" in bad.end[1]
    assert good.done.wait(30) and good.tokens == offline(ref, "c", [5, 6], 4)
    assert "broken@1" not in eng.bank.resident
    # a prompt the model cannot embed, admitted together with a good one: only it fails
    gate = threading.Event()
    eng.call(gate.wait)
    bad, good = Collect(), Collect()
    eng.submit(GenRequest([5, 999], [], 4, sink=bad))
    eng.submit(GenRequest([7, 8, 9], [use(root, "c")], 4, sink=good))
    gate.set()
    assert bad.done.wait(30) and bad.end[0] == "error" and "prefill failed" in bad.end[1]
    assert good.done.wait(30) and good.tokens == offline(ref, "c", [7, 8, 9], 4)


def test_adapters_are_checked_on_the_loader_thread(adapters, tmp_path, start_engine):
    """validate_adapter (every tensor scanned) runs where the file is read, not on the engine thread that decodes
    everyone's rows; a file that fails the check still fails its request alone."""
    root, ref = adapters
    eng = start_engine(max_slots=2, max_batch=4)
    threads, prepare = [], eng.bank.prepare

    def recorded(af):
        threads.append(threading.current_thread().name)
        return prepare(af)
    eng.bank.prepare = recorded
    af = read_adapter(root / "a")
    af.tensors[next(k for k in af.tensors if k.endswith("lora_B.weight"))][0, 0] = float("nan")
    bad, good = Collect(), Collect()
    eng.submit(GenRequest([5, 6], [AdapterUse("nan@1", lambda: af)], 4, sink=bad))
    eng.submit(GenRequest([5, 6], [use(root, "b")], 4, sink=good))
    assert bad.done.wait(30) and bad.end[0] == "error" and "non-finite" in bad.end[1]
    assert good.done.wait(30) and good.tokens == offline(ref, "b", [5, 6], 4)
    assert len(threads) == 2 and all(n.startswith("lorakit-adapter-load") for n in threads), threads
    assert "nan@1" not in eng.bank.resident and "b@1" in eng.bank.resident


def test_sampling_is_seeded(adapters, start_engine):
    root, _ = adapters
    eng = start_engine(max_slots=1, max_batch=4)
    outs = []
    for seed in (1, 1, 2):
        c = Collect()
        eng.submit(GenRequest([5, 6, 7], [], max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                              ignore_eos=True, sink=c))
        assert c.done.wait(30)
        outs.append(c.tokens)
    assert outs[0] == outs[1] and outs[0] != outs[2] and len(outs[0]) == 12


def test_refuses_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        Engine(m, TOK)
