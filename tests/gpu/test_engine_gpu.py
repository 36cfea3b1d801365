"""The static-cache engine on the GPU: decode steps replayed from CUDA graphs (Triton decode attention, mixed
adapters added into the base output in place) give the offline greedy tokens in fp32, token for token, with rows
of different lengths and adapters, also on models with sliding windows shorter than the rows (Mistral, Gemma 2)
and soft-capped attention scores (Gemma 2); the kernels it adds against their references (bf16, llama-1b widths;
decode attention also with windows and soft-caps, in bf16 and fp32)."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import read_adapter
from lorakit.generate import generate_ids
from lorakit.kernels import attention, lora_add, reference
from lorakit.models import tiny_decoder, tiny_llama
from lorakit.serve.engine import AdapterUse, GenRequest
from lorakit.serve.fast import StaticEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from engine_helpers import TOK, Collect, save_tiny_adapters  # noqa: E402

pytest.importorskip("triton")


def run_gated(eng: StaticEngine, requests: list[dict]) -> tuple[list[list[int]], dict]:
    """Start `eng`, hold its thread while every request (GenRequest's fields) is submitted, so they are admitted
    together, wait for all, stop it. -> each request's tokens, the engine's info() after the last."""
    eng.start()
    try:
        sinks = [Collect() for _ in requests]
        gate = threading.Event()
        eng.call(gate.wait)
        for r, s in zip(requests, sinks):
            eng.submit(GenRequest(**r, sink=s))
        gate.set()
        for s in sinks:
            assert s.done.wait(120)
        return [s.tokens for s in sinks], eng.info()
    finally:
        eng.stop()


def test_lora_add_in_place_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    for b, s in ((64, 1), (4, 96)):
        A = (torch.randn(9, 16, 2048, generator=g, device="cuda") / 45).bfloat16()
        B = (torch.randn(9, 8192, 16, generator=g, device="cuda") * 0.02).bfloat16()
        x = torch.randn(b, s, 2048, generator=g, device="cuda").bfloat16()
        idx = torch.randint(0, 9, (b, 1), device="cuda")
        coef = torch.rand(b, 1, device="cuda") * 2
        y = torch.randn(b, s, 8192, generator=g, device="cuda").bfloat16()
        want = y.double() + reference.lora_delta(x.double(), A.double(), B.double(), idx, coef.double())
        got = lora_add(y, x, A, B, idx, coef)
        assert got.data_ptr() == y.data_ptr()
        err = float((got.double() - want).norm() / want.norm())
        assert err < 1e-2, (b, s, err)  # one bf16 rounding of out + delta (2^-8 relative per element)


def test_grouped_adds_match_the_reference_per_member_bf16():
    """kernels.lora_add_group on CUDA (the custom op: one shrink and one expand launch for q/k/v-like members of
    widths 2048 / 512 / 512, stacks of two with a slot of -1), eager and replayed from a CUDA graph, against each
    member's fp64 reference; the outputs are written in place."""
    from lorakit.kernels import lora_add_group

    g = torch.Generator(device="cuda").manual_seed(2)
    outs = (2048, 512, 512)
    As = [(torch.randn(9, 16, 2048, generator=g, device="cuda") / 45).bfloat16() for _ in outs]
    Bs = [(torch.randn(9, n, 16, generator=g, device="cuda") * 0.02).bfloat16() for n in outs]
    x = torch.randn(64, 1, 2048, generator=g, device="cuda").bfloat16()
    idx = torch.randint(-1, 9, (64, 2), device="cuda")
    coef = torch.rand(64, 2, device="cuda") * 2
    ys = [torch.randn(64, 1, n, generator=g, device="cuda").bfloat16() for n in outs]
    want = [y.double() + reference.lora_delta(x.double(), A.double(), B.double(), idx, coef.double())
            for y, A, B in zip(ys, As, Bs)]
    for replay in (False, True):
        got = [y.clone() for y in ys]
        if replay:
            graph = torch.cuda.CUDAGraph()
            lora_add_group([y.clone() for y in ys], x, As, Bs, idx, coef)  # warm-up: kernels built outside capture
            with torch.cuda.graph(graph):
                lora_add_group(got, x, As, Bs, idx, coef)
            graph.replay()
        else:
            ptrs = [t.data_ptr() for t in got]
            assert [t.data_ptr() for t in lora_add_group(got, x, As, Bs, idx, coef)] == ptrs
        for a, w in zip(got, want):
            err = float((a.double() - w).norm() / w.norm())
            assert err < 1e-2, (replay, err)  # one bf16 rounding of out + delta (2^-8 relative per element)


def test_decode_attention_matches_reference_bf16():
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(64, 32, 64, generator=g, device="cuda").bfloat16()
    K = torch.randn(65, 8, 776, 64, generator=g, device="cuda").bfloat16()
    V = torch.randn(65, 8, 776, 64, generator=g, device="cuda").bfloat16()
    rows = torch.randperm(64, device="cuda")
    lens = torch.randint(1, 777, (64,), device="cuda")
    want = attention.reference(q.double(), K.double(), V.double(), rows, lens, 0.125)
    got = attention.decode_attention(q, K, V, rows, lens, 0.125).double()
    err = float((got - want).norm() / want.norm())
    assert err < 1e-2, err


@pytest.mark.parametrize("window, cap", [(None, 2.0), (256, None), (100, 5.0), (1, None), (64, 2.0), (4096, 2.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_window_softcap_matches_reference(window, cap, dtype):
    """Rows of 1 .. 776 positions, windows shorter and longer than them (1: the token itself; 64: one block;
    4096: past the capacity), caps that bend scores of scale ~1. The reference sees the same inputs in float64.
    bf16: the kernel rounds the softmax weights to bf16 before P @ V and the output once (each 2^-9 relative per
    element): 1e-2 of the output's norm is 2.5 x 2^-8. fp32 (ieee dots, fp32 online softmax): sums of at most 776
    terms, sqrt(776) x 2^-24 ~ 2e-6, bounded by 1e-5."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(64, 32, 64, generator=g, device="cuda").to(dtype)
    K = torch.randn(65, 8, 776, 64, generator=g, device="cuda").to(dtype)
    V = torch.randn(65, 8, 776, 64, generator=g, device="cuda").to(dtype)
    rows = torch.randperm(64, device="cuda")
    lens = torch.randint(1, 777, (64,), device="cuda")
    lens[:4] = torch.tensor([1, 2, 776, 65], device="cuda")
    want = attention.reference(q.double(), K.double(), V.double(), rows, lens, 0.125, window, cap)
    got = attention.decode_attention(q, K, V, rows, lens, 0.125, window=window, softcap=cap).double()
    err = float((got - want).norm() / want.norm())
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_graph_decode_windows_and_softcap_greedy_equals_generate(kind, tmp_path):
    """models.TINY's windows of 8 (Mistral every layer, Gemma 2 every other) and Gemma 2's attention soft-cap of 1.0
    in graph-replayed decode and chunked prefill: rows of 3 .. 20 prompt tokens and 16 new, base and adapter rows
    together, equal to transformers' generate on the same model (the adapter active) token for token in fp32."""
    base = tiny_decoder(kind)
    torch.manual_seed(5)
    # the adapter drawn on the CPU: on 2026-12-05 drawing it on the GPU after the previous case's graph captures
    # raised "Offset increment outside graph capture" (bench/results/gpu_engine_tests_profile_h100_2026-12-05.txt)
    add_adapter(base, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False), "a")
    base = base.cuda()
    save_adapter(base, tmp_path / "a", "a")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 14, 20, 20)]
    names = [None, "a", None, "a", None]
    n, want = 16, []
    for name, p in zip(names, prompts):
        set_active(base, name)
        ids = torch.tensor([p], device="cuda")
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    set_active(base, None)
    assert want[3] != want[4]  # the adapter changes what the model says
    eng = StaticEngine(tiny_decoder(kind).cuda(), TOK, max_slots=2, max_batch=8, max_len=64, prefill_chunk=7)
    a = [AdapterUse("a@1", lambda: read_adapter(tmp_path / "a"))]
    got, info = run_gated(eng, [dict(prompt=p, adapters=a if name else [], max_tokens=n, ignore_eos=True)
                                for name, p in zip(names, prompts)])
    assert got == want
    assert info["graphs"] >= 1 and info["max_rows"] == len(prompts)
    assert info["graph_failures"] == 0  # no step fell back to eager decode (which hides a failed capture)


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_decode_greedy_equals_offline_fp32(tmp_path, monkeypatch, compiled):
    """Rows of different lengths and adapters, decode from CUDA graphs, greedy tokens equal offline generation in
    fp32; `compiled`: the step through torch.compile before capture (LORAKIT_DECODE_COMPILE=1, off by default
    until this passes on a GPU)."""
    monkeypatch.setenv("LORAKIT_DECODE_COMPILE", "1" if compiled else "0")
    root, ref = save_tiny_adapters(tmp_path)
    ref = ref.cuda()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 10, 11], [3] + list(range(20, 37)), [40, 41, 42, 43, 44, 45]]
    names = ["a", None, "b", "c"]
    n = 16
    want = []
    for name, p in zip(names, prompts):
        set_active(ref, name)
        want.append(generate_ids(ref, TOK, [p], max_new_tokens=n)[0])
    set_active(ref, None)
    eng = StaticEngine(tiny_llama().cuda(), TOK, max_slots=3, max_batch=4, max_len=64, prefill_chunk=7)
    assert (eng.decoder._body != eng.decoder._decode_body) == compiled  # the step that gets captured
    got, info = run_gated(eng, [dict(prompt=p, adapters=[AdapterUse(f"{name}@1", lambda name=name:
                                                                    read_adapter(root / name))] if name else [],
                                     max_tokens=n) for name, p in zip(names, prompts)])
    assert got == want
    assert info["graphs"] >= 1 and info["graph_failures"] == 0  # decode ran from captured graphs, none failed
