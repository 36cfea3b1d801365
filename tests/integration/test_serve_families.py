"""Greedy decoding through the engine equals offline `model.generate` token for token (fp32, CPU) on a tiny random
model of every family the server runs (models.TINY: windows shorter than the prompts, soft-caps, q/k norms, partial
RoPE, fused qkv and gate_up, sandwich norms), with six rows of four prompt lengths in one batch: base rows and rows
of two adapters on every linear layer (Phi-3's fused qkv_proj and gate_up_proj included), against PEFT's model
with that adapter loaded, through the plain engine and through the static-cache engine (windows and soft-capped
scores in its prefill chunks and its decode attention); and a prompt longer than the engine's CHUNK, prefilled a
chunk at a time (forward.extend, windows masked across chunk boundaries)."""
import copy
import threading

import pytest
import torch
from peft import PeftModel

from lorakit import LoraConfig, add_adapter, delete_adapter, save_adapter
from lorakit.adapters.peft_files import read_adapter
from lorakit.models import TINY, tiny_decoder
from lorakit.serve.engine import CHUNK, AdapterUse, Engine, GenRequest
from lorakit.serve.fast import StaticEngine
from engine_helpers import TOK, Collect

N = 12  # new tokens: the longest row ends at 32, four windows of 8
LENGTHS = [3, 9, 14, 20]
ROWS = [(0, None), (1, "a"), (2, "b"), (3, "a"), (3, None), (2, "a")]  # (prompt, adapter)


def _adapters(model, root):
    """Adapters a and b (r=4 on every linear layer, B random so they change what the model says) saved under root."""
    for seed, name in enumerate("ab"):
        torch.manual_seed(100 + seed)
        add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear"), name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(f".{name}.lora_B"):
                    p.normal_(0, 0.3)
        save_adapter(model, root / name, name)
        delete_adapter(model, name)


def _generate(model, prompt):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=0,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy_rows(base, tmp_path, make_engine, lengths=LENGTHS):
    """The six rows through make_engine(copy of base), held so they are prefilled and decoded together, against
    generate on base and on PEFT's model with each adapter."""
    _adapters(copy.deepcopy(base), tmp_path)
    keys = {p for p in read_adapter(tmp_path / "a").modules()}
    assert any(k.endswith(("qkv_proj", "q_proj")) for k in keys) and any(k.endswith(("gate_up_proj", "gate_proj"))
                                                                         for k in keys)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    refs = {None: base}
    for name in "ab":
        refs[name] = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
    want = [_generate(refs[a], prompts[p]) for p, a in ROWS]
    assert all(len(w) == N for w in want)
    assert want[3] != want[4] and want[2] != want[5]  # the adapters change what the model says

    eng = make_engine(copy.deepcopy(base)).start()
    try:
        gate = threading.Event()
        eng.call(gate.wait)  # hold the engine so that all rows are prefilled and decoded together
        sinks = [Collect() for _ in ROWS]
        for (p, a), sink in zip(ROWS, sinks):
            use = [] if a is None else [AdapterUse(f"{a}@1", lambda a=a: read_adapter(tmp_path / a))]
            eng.submit(GenRequest(prompts[p], use, max_tokens=N, ignore_eos=True, sink=sink))
        gate.set()
        assert all(s.done.wait(60) for s in sinks)
        assert eng.stats["max_rows"] == len(ROWS)  # all six decoded in the same steps
        assert [s.tokens for s in sinks] == want
    finally:
        eng.stop()


# Phi-3 with longrope: rows of 2 and 3 tokens stay inside the original 16 positions while they decode, rows of 17 and
# 20 start past it (long factors), decoded together. A row that crosses it while decoding is not served as offline:
# transformers' Phi-3 generate then recomputes the whole sequence with the long factors, the engines do not.
LONGROPE = dict(original_max_position_embeddings=16, rope_scaling={
    "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0]})
LONGROPE_LENGTHS = [2, 3, 17, 20]


@pytest.mark.parametrize("case", list(TINY) + ["phi3-longrope"])
def test_engine_greedy_equals_generate(case, tmp_path):
    longrope = case == "phi3-longrope"
    base = tiny_decoder(case.split("-")[0], **(LONGROPE if longrope else {}))
    _greedy_rows(base, tmp_path, lambda m: Engine(m, TOK, max_slots=2, max_batch=8),
                 LONGROPE_LENGTHS if longrope else LENGTHS)


# the static engine's rows of 64 positions on the tiny models as they are: windows of 8 (every layer of Mistral and
# Phi-3, alternating layers of Qwen2, Gemma 2 and Gemma 3), shorter than prompts of 9, 14 and 20 and than the rows
# they grow into; Gemma 2's soft-capped attention scores
STATIC = {k: {} for k in TINY}
STATIC["phi3-longrope"] = LONGROPE


@pytest.mark.parametrize("case", list(STATIC))
def test_static_engine_greedy_equals_generate(case, tmp_path):
    """The static-cache engine (serve/fast.py, eager on the CPU; prompts prefilled in chunks of 16: the chunk at 16
    attends across the boundary through its window)."""
    base = tiny_decoder(case.split("-")[0], **STATIC[case])
    longrope = case == "phi3-longrope"
    _greedy_rows(base, tmp_path, lambda m: StaticEngine(m, TOK, max_slots=2, max_batch=8, max_len=64,
                                                          prefill_chunk=16), LONGROPE_LENGTHS if longrope else LENGTHS)
    if longrope:  # its tables are computed row by row: no graph replays them
        assert StaticEngine(base, TOK, max_batch=2, max_len=64, graphs=True).decoder.graphs is False


@pytest.mark.parametrize("kind", list(TINY))
def test_chunked_prefill_equals_generate(kind, tmp_path):
    base = tiny_decoder(kind)
    _adapters(copy.deepcopy(base), tmp_path)
    prompt = torch.randint(3, 128, (2 * CHUNK + 11,), generator=torch.Generator().manual_seed(1)).tolist()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    want = [_generate(base, prompt), _generate(peft, prompt)]
    eng = Engine(copy.deepcopy(base), TOK, max_slots=1, max_batch=2).start()
    try:
        sinks = [Collect(), Collect()]
        for a, sink in zip([None, "a"], sinks):
            use = [] if a is None else [AdapterUse(f"{a}@1", lambda a=a: read_adapter(tmp_path / a))]
            eng.submit(GenRequest(prompt, use, max_tokens=N, ignore_eos=True, sink=sink))
        assert all(s.done.wait(60) for s in sinks)
        assert [s.tokens for s in sinks] == want
    finally:
        eng.stop()
