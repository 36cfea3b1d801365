"""The mixed-adapter LoRA kernels (lorakit.kernels.triton_lora) against reference.lora_delta, on the CPU
under the Triton interpreter (a subprocess with TRITON_INTERPRET=1), fp32, small and odd shapes; every
case runs through both variants (gather, segment) at one token a row and at several. The DoRA contract
itself (reference.lora_delta with `dora`) is checked against core/layer.py's DoRA forward here too."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from lorakit import kernels
from lorakit.core.layer import LoraLinear
from lorakit.kernels.reference import dora_slot, lora_delta

CHECK = textwrap.dedent("""
    import json
    import torch
    from lorakit.kernels.reference import lora_delta
    from lorakit.kernels import triton_lora

    def bank(S, r, din, dout, ranks=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        A, B = torch.randn(S, r, din, generator=g) * 0.3, torch.randn(S, dout, r, generator=g) * 0.3
        A[0], B[0] = 0, 0
        for slot, rk in (ranks or {}).items():  # an adapter of smaller rank, zero-padded to r
            A[slot, rk:], B[slot, :, rk:] = 0, 0
        return A, B, g

    def case(b, s, din, dout, S, r, idx, coef, ranks=None, dora=False, strided=False):
        A, B, g = bank(S, r, din, dout, ranks)
        x = torch.randn(b, s, din + 3 * strided, generator=g)[..., :din]  # strided: a non-contiguous view
        idx, coef = torch.tensor(idx), torch.tensor(coef)
        kw = {}
        if dora:
            kw = dict(dora=torch.randn(S, dout, generator=g) * 0.2, base=torch.randn(b, s, dout, generator=g))
        want = lora_delta(x, A, B, idx, coef, **kw)
        errs = {m: float((triton_lora.lora_delta(x, A, B, idx, coef, mode=m, **kw) - want).abs().max())
                for m in ("gather", "segment")}
        errs["auto"] = float((triton_lora.lora_delta(x, A, B, idx, coef, **kw) - want).abs().max())
        return dict(errs, scale=float(want.abs().max()), zero_rows=[
            float(triton_lora.lora_delta(x, A, B, idx, coef, mode=m, **kw)[i].abs().max())
            for m in ("gather", "segment") for i in range(b) if all(
                int(v) < 0 or float(c) == 0 for v, c in zip(idx[i], coef[i])) and not dora])

    out = {}
    for s in (1, 5):
        out[f"single_s{s}"] = case(4, s, 32, 24, 4, 8, [[2]] * 4, [[1.5]] * 4)
        out[f"mixed_s{s}"] = case(6, s, 32, 24, 5, 8, [[1], [3], [0], [4], [2], [1]],
                                  [[1.0], [0.5], [1.0], [-2.0], [1.0], [0.25]])
        out[f"stack_s{s}"] = case(3, s, 32, 24, 5, 8, [[1, 2, 3], [4, 1, -1], [2, 0, 0]],
                                  [[0.7, 0.3, -0.5], [1.0, -0.4, 9.0], [2.0, 0.0, 0.0]])
        out[f"padded_s{s}"] = case(4, s, 40, 24, 4, 5, [[1], [2], [3], [1]], [[1.0], [0.5], [2.0], [-1.0]],
                                   ranks={1: 2, 2: 3})
        out[f"no_adapter_s{s}"] = case(4, s, 32, 24, 4, 4, [[-1, -1], [1, -1], [2, 3], [3, 1]],
                                       [[1.0, 1.0], [1.0, 5.0], [0.0, 0.0], [1.0, 0.5]])
        out[f"odd_s{s}"] = case(5, s + 2, 37, 23, 4, 3, [[1], [3], [-1], [2], [1]],
                                [[0.3], [1.0], [1.0], [-1.5], [0.0]], strided=True)
        out[f"dora_s{s}"] = case(3, s, 32, 24, 4, 8, [[1, 2], [3, -1], [0, 0]],
                                 [[0.6, -0.4], [1.0, 1.0], [0.0, 0.0]], dora=True)
        # several tiles of every kind: `in` split over shrink programs, out blocks, token blocks (s = 70)
        out[f"tiles_s{s}"] = case(3, 14 * s, 600, 200, 6, 16, [[1, 5], [3, -1], [2, 4]],
                                  [[0.5, 0.5], [1.0, 0.0], [-1.0, 0.2]], ranks={4: 11}, dora=True)
    def folded(T, din, dout, S, r, idx, coef, ranks=None):  # the folded decode experiment: matmul + one expand
        A, B, g = bank(S, r, din, dout, ranks, seed=3)
        W, x = torch.randn(dout, din, generator=g) * 0.2, torch.randn(T, din, generator=g)
        idx, coef = torch.tensor(idx), torch.tensor(coef)
        want = x @ W.T + lora_delta(x[:, None], A, B, idx, coef)[:, 0]
        got = triton_lora.folded_decode(x, triton_lora.fold_weight(W, A), dout, B, idx, coef)
        return dict(err=float((got - want).abs().max()), scale=float(want.abs().max()),
                    delta=float((want - x @ W.T).abs().max()))

    out["folded_mixed"] = folded(6, 32, 24, 5, 8, [[1], [3], [0], [4], [-1], [1]],
                                 [[1.0], [0.5], [1.0], [-2.0], [1.0], [0.25]], ranks={3: 5})
    out["folded_stack_tiles"] = folded(9, 40, 150, 6, 16, [[1, 5], [3, -1], [2, 4]] * 3,
                                       [[0.5, 0.5], [1.0, 0.0], [-1.0, 0.2]] * 3, ranks={4: 11})
    def grouped(T, din, outs, ranks, S, idx, coef):  # lora_add_group: members of other widths and ranks
        from lorakit.kernels.triton_lora_group import lora_add_group
        g = torch.Generator().manual_seed(5)
        banks = [bank(S, r, din, n, seed=7 + i)[:2] for i, (n, r) in enumerate(zip(outs, ranks))]
        ys = [torch.randn(T, n, generator=g) for n in outs]
        x, idx, coef = torch.randn(T, din, generator=g), torch.tensor(idx), torch.tensor(coef)
        want = [y + lora_delta(x[:, None], A, B, idx, coef)[:, 0] for y, (A, B) in zip(ys, banks)]
        got = lora_add_group([y.clone() for y in ys], x, [A for A, _ in banks], [B for _, B in banks], idx, coef)
        return dict(err=max(float((a - w).abs().max()) for a, w in zip(got, want)),
                    scale=max(float(w.abs().max()) for w in want),
                    delta=min(float((w - y).abs().max()) for w, y in zip(want, ys)))

    out["grouped_qkv"] = grouped(6, 600, [200, 24, 70], [16, 8, 5], 5, [[1, 2], [3, -1], [0, 0], [4, 1], [2, 2],
                                 [1, 3]], [[0.5, 0.5], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.2], [0.3, 0.1], [1.0, 1.0]])
    out["grouped_pair_odd"] = grouped(5, 37, [23, 150], [3, 3], 4, [[1], [3], [-1], [2], [1]],
                                      [[0.3], [1.0], [1.0], [-1.5], [0.0]])
    splits = {m: triton_lora.split_in(600, cfg["BK"], 3, cfg["target"])[1]
              for m, cfg in (("gather", triton_lora.GATHER), ("segment", triton_lora.SEGMENT))}
    out["tiles_s1"]["splits"] = splits
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_close(out, name):
    for s in (1, 5):
        c = out[f"{name}_s{s}"]
        assert c["scale"] > 0.1, c  # the case computes something
        for mode in ("gather", "segment", "auto"):
            assert c[mode] <= 1e-5 * max(1.0, c["scale"]), (name, s, mode, c)
        assert all(z == 0.0 for z in c["zero_rows"]), c  # rows with no adapter: exactly nothing added


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "mixed", "stack", "padded", "no_adapter", "odd", "dora", "tiles"])
def test_triton_lora_matches_reference_in_interpreter(interpreted, name):
    _assert_close(interpreted, name)
    if name == "no_adapter":
        assert len(interpreted["no_adapter_s1"]["zero_rows"]) == 4  # rows 0 and 2, both variants
    if name == "tiles":
        assert min(interpreted["tiles_s1"]["splits"].values()) > 1, interpreted["tiles_s1"]  # split-K path ran


@pytest.mark.slow
@pytest.mark.parametrize("name", ["folded_mixed", "folded_stack_tiles"])
def test_folded_decode_matches_base_plus_reference_in_interpreter(interpreted, name):
    """x [W; A_slots]^T then one expand = x W^T + the reference delta: odd ranks, no-adapter rows, stacks of 2,
    several row and out tiles (9 rows, 150 outputs). fp32 throughout: sums of <= 40 products, 1e-5 relative."""
    c = interpreted[name]
    assert c["delta"] > 0.1 * c["scale"], c  # the adapters change the output: the case tests the expand
    assert c["err"] <= 1e-5 * max(1.0, c["scale"]), c


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grouped_qkv", "grouped_pair_odd"])
def test_grouped_decode_kernels_match_the_reference_per_member_in_interpreter(interpreted, name):
    """lora_add_group (one shrink and one expand launch for projections sharing an input) = each member's output
    plus its reference delta: three members of widths 200 / 24 / 70 and ranks 16 / 8 / 5 (several out tiles, a
    split `in`), stacks of 2, slot -1, zero coefficients; fp32, sums of <= 600 products, 1e-5 relative."""
    c = interpreted[name]
    assert c["delta"] > 0.1, c  # every member's output changes: the case tests each member's expand
    assert c["err"] <= 1e-5 * max(1.0, c["scale"]), c


def test_slot_minus_one_and_zero_coef_add_nothing():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 4, generator=g)  # slot 0 not zero here
    x = torch.randn(3, 2, 8, generator=g)
    got = lora_delta(x, A, B, torch.tensor([[-1, -1], [1, -1], [0, 2]]), torch.tensor([[1.0, 2], [1, 3], [0, 1]]))
    assert torch.equal(got[0], torch.zeros(2, 6))
    torch.testing.assert_close(got[1], x[1] @ A[1].T @ B[1].T)
    torch.testing.assert_close(got[2], x[2] @ A[2].T @ B[2].T)


def test_dora_contract_matches_layer_forward():
    """Slots filled by dora_slot + reference.lora_delta(dora, base) == LoraLinear's DoRA forward, per row,
    stacks included (weights on DoRA and plain adapters, scale folded differently in coef)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12, bias=True))
    for name, dora, r in (("d", True, 4), ("e", True, 2), ("p", False, 3)):
        p = layer.add(name, r=r, alpha=8, dropout=0.0, use_rslora=False, use_dora=dora, init_b_zero=False)
        if dora:
            with torch.no_grad():
                p.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(12))
    W, r_max = layer.base_weight(), 4
    A, B, D = torch.zeros(4, r_max, 16), torch.zeros(4, 12, r_max), torch.zeros(4, 12)
    coef_scale = {}
    for slot, name in enumerate("dep", start=1):
        p = layer.adapters[name]
        c = coef_scale[name] = p.scale * (0.5 if name == "e" else 1.0)  # "e": part of its scale folded into B
        A[slot, :p.r] = p.lora_A.detach()
        if p.lora_magnitude_vector is None:
            B[slot, :, :p.r] = p.lora_B.detach() * (p.scale / c)
        else:
            B[slot, :, :p.r], D[slot] = dora_slot(W, p.lora_A.detach(), p.lora_B.detach(),
                                                  p.lora_magnitude_vector.detach(), p.scale, c)
    uses = [{}, {"d": 1.0}, {"p": 1.0}, {"d": 0.6, "e": 1.5, "p": -0.4}, {"e": 1.0}]
    x = torch.randn(len(uses), 3, 16)
    want = []
    with torch.no_grad():
        for i, use in enumerate(uses):
            layer.active = dict(use)
            want.append(layer(x[i]))
        names = ["d", "e", "p"]
        idx = torch.tensor([[names.index(n) + 1 if n in u else -1 for n in names] for u in uses])
        coef = torch.tensor([[u.get(n, 0.0) * coef_scale[n] for n in names] for u in uses])
        layer.active = {}
        y0 = layer(x)  # base output, bias included
        got = y0 + kernels.lora_delta(x, A, B, idx, coef, dora=D, base=x @ W.T)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


def test_cuda_dispatch_registered_only_with_triton():
    import importlib.util

    has = importlib.util.find_spec("triton") is not None
    assert ("cuda" in kernels.IMPLS) == has
    assert "cpu" not in kernels.IMPLS  # the reference stays the default elsewhere
