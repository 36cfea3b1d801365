"""The static-cache engine's kernels on the CPU under the Triton interpreter, fp32: decode attention
(kernels/triton_attn.py) against the reference (kernels/attention.py): GQA, rows of different lengths in any cache
rows, lengths of one position and of the whole capacity, head sizes that are not powers of two, 1 and several
position chunks, sliding windows (shorter than some rows, across chunk and block boundaries) and soft-capped scores;
and the reference itself against each row's attention written out (window, soft-cap)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorakit.kernels import attention

CHECK = textwrap.dedent("""
    import json
    import torch
    from lorakit.kernels import attention, triton_attn

    out = {}
    g = torch.Generator().manual_seed(0)
    for b, H, KVH, D, L in [(3, 4, 2, 16, 40), (2, 6, 2, 24, 130), (1, 2, 2, 16, 16), (4, 8, 1, 32, 70)]:
        q = torch.randn(b, H, D, generator=g)
        K, V = torch.randn(5, KVH, L, D, generator=g), torch.randn(5, KVH, L, D, generator=g)
        rows = torch.tensor([4, 0, 2, 1][:b])
        lens = torch.tensor([L, 1, L // 2 + 3, 7][:b])
        for window, cap in [(None, None), (5, None), (None, 1.5), (33, 2.0), (16, None)]:
            ref = attention.reference(q, K, V, rows, lens, D ** -0.5, window, cap)
            for ns in (None, 1, 3) if window is None and cap is None else (None, 3):
                got = triton_attn.decode_attention(q, K, V, rows, lens, D ** -0.5, nsplit=ns, window=window,
                                                   softcap=cap)
                case = f"{b}-{H}-{KVH}-{D}-{L}-{ns}-{window}-{cap}"
                out[case] = [float((got - ref).abs().max()), float(ref.abs().max())]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_triton_decode_attention_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for case, (err, scale, *same) in json.loads(res.stdout.strip().splitlines()[-1]).items():
        assert scale > 0.1 and err <= 1e-5 * max(1.0, scale) and same in ([], [True]), (case, err, scale)


def test_reference_is_sdpa_of_each_row_alone():
    """The reference, row by row: softmax over the row's own first `length` positions (GQA: head h reads kv head
    h // groups), whatever the other rows and positions hold (NaN included)."""
    g = torch.Generator().manual_seed(1)
    q, K, V = torch.randn(3, 4, 8, generator=g), torch.randn(4, 2, 10, 8, generator=g), torch.randn(4, 2, 10, 8, generator=g)
    rows, lens = torch.tensor([3, 0, 1]), torch.tensor([10, 1, 4])
    K[2], V[2] = float("nan"), float("nan")  # a row nobody reads
    got = attention.reference(q, K, V, rows, lens, 0.3)
    for i in range(3):
        r, n = int(rows[i]), int(lens[i])
        for h in range(4):
            k, v = K[r, h // 2, :n], V[r, h // 2, :n]
            want = torch.softmax(q[i, h] @ k.T * 0.3, 0) @ v
            assert torch.allclose(got[i, h], want, atol=1e-6), (i, h)


@pytest.mark.parametrize("window, cap", [(None, None), (3, None), (1, None), (None, 0.7), (4, 0.7), (20, 2.0)])
def test_reference_window_and_softcap_row_by_row(window, cap):
    """decode_attention on the CPU (the reference): the query at position n - 1 of its row sees positions
    n - window .. n - 1 (transformers' sliding window: key j seen from position p when j > p - window), scores
    c * tanh(s / c) before the mask; rows shorter than the window see all their positions. Positions before a
    row's window hold large values: any leak shows."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 6, 8, generator=g) * 2
    K, V = torch.randn(5, 3, 12, 8, generator=g), torch.randn(5, 3, 12, 8, generator=g)
    rows, lens = torch.tensor([4, 0, 1, 3]), torch.tensor([12, 1, 4, 9])
    if window is not None:
        for r, n in zip(rows.tolist(), lens.tolist()):
            V[r, :, : max(0, n - window)] = 1e4
    got = attention.decode_attention(q, K, V, rows, lens, 0.4, window=window, softcap=cap)
    for i in range(4):
        r, n = int(rows[i]), int(lens[i])
        lo = 0 if window is None else max(0, n - window)
        for h in range(6):
            k, v = K[r, h // 2, lo:n], V[r, h // 2, lo:n]
            s = q[i, h] @ k.T * 0.4
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            want = torch.softmax(s, 0) @ v
            assert torch.allclose(got[i, h], want, atol=1e-5), (i, h)
