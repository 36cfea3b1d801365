"""The static-cache engine on the GPU: decode steps replayed from CUDA graphs (Triton decode attention, mixed
adapters added into the base output in place) give the offline greedy tokens in fp32, token for token, with rows
of different lengths and adapters; the kernels it adds against their references (bf16, llama-1b widths)."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from lorakit import set_active
from lorakit.adapters.peft_files import read_adapter
from lorakit.generate import generate_ids
from lorakit.kernels import attention, lora_add, reference
from lorakit.models import tiny_llama
from lorakit.serve.engine import AdapterUse, GenRequest
from lorakit.serve.fast import StaticEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from engine_helpers import TOK, Collect, save_tiny_adapters  # noqa: E402

pytest.importorskip("triton")


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


def test_graph_decode_greedy_equals_offline_fp32(tmp_path):
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
    eng = StaticEngine(tiny_llama().cuda(), TOK, max_slots=3, max_batch=4, max_len=64, prefill_chunk=7).start()
    try:
        sinks = [Collect() for _ in prompts]
        gate = threading.Event()
        eng.call(gate.wait)
        for name, p, s in zip(names, prompts, sinks):
            eng.submit(GenRequest(p, [AdapterUse(f"{name}@1", lambda name=name: read_adapter(root / name))]
                                  if name else [], max_tokens=n, sink=s))
        gate.set()
        for s in sinks:
            assert s.done.wait(120)
        info = eng.info()
    finally:
        eng.stop()
    assert [s.tokens for s in sinks] == want
    assert info["graphs"] >= 1  # decode ran from captured graphs
