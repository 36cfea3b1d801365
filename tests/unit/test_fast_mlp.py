"""The fused LoRA MLP (lorakit.train.fast.mlp) against the plain path, and its Triton kernels (and the
in-place loss kernel, lorakit.kernels) against the plain-torch reference under the Triton interpreter, in fp32."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.train import fast
from lorakit.train.fast.mlp import fusable_mlp
from lorakit.models import tiny_llama


def uneven_model():
    """Different ranks on gate, up and down (3, 8, 5): exercises the rank padding and the split of
    d(s xA) between the gate and up parts."""
    model = tiny_llama(0)
    torch.manual_seed(1)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False,
                                  rank_pattern={"gate_proj": 3, "up_proj": 8, "down_proj": 5}))
    return model.train()


def test_fused_mlp_matches_plain_path_with_uneven_ranks():
    plain = uneven_model()
    fm = fast.prepare(copy.deepcopy(plain), compile=False, fused_mlp=True).train()
    p = fm.layer_params()[0]
    assert fm.spec.fused_mlp and fusable_mlp(p.gate_up, p.down, training=True)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    l1 = plain(input_ids=x, labels=x).loss
    l1.backward()
    l2 = fm(x)
    l2.backward()
    assert abs(l1.item() - l2.item()) < 1e-5 * abs(l1.item())
    names = [n for n, q in plain.named_parameters() if q.requires_grad]
    assert any("gate_proj" in n and n.endswith("lora_A") for n in names)
    for n, a, b in zip(names, [q for q in plain.parameters() if q.requires_grad], fm.trainable_parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-5 * float(a.grad.abs().max()) + 1e-8, n


def test_dropout_on_the_mlp_falls_back_to_the_unfused_path():
    model = tiny_llama(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    fm = fast.prepare(model, compile=False, fused_mlp=True)
    p = fm.layer_params()[0]
    assert not fusable_mlp(p.gate_up, p.down, training=True)
    assert fusable_mlp(p.gate_up, p.down, training=False)


KERNEL_CHECK = textwrap.dedent("""
    import json
    import torch
    from lorakit.kernels import pad_rows as _pad_rows, pad_cols as _pad_cols
    from lorakit.kernels.reference import swiglu_lora_fwd_ref, swiglu_lora_bwd_ref, chunk_loss_and_grad
    from lorakit.kernels.triton_mlp import swiglu_lora_fwd, swiglu_lora_bwd
    from lorakit.kernels.triton_ce import ce_chunk_inplace

    def rel(x, r):
        return float((x.double() - r.double()).norm() / r.double().norm())

    torch.manual_seed(0)
    T, F, R, rg, ru, rd = 40, 96, 16, 3, 8, 5        # T, F not multiples of the blocks
    y = torch.randn(T, 2 * F)
    a = torch.randn(rd, F) * 0.1
    h, ha = swiglu_lora_fwd(y, _pad_rows(a, R).contiguous(), block=(16, 32), cols=64)
    hr, har = swiglu_lora_fwd_ref(y, a)
    out = {"h": rel(h, hr), "ha": rel(ha[:, :rd], har), "ha_pad": float(ha[:, rd:].abs().max())}
    dhb, dsha = torch.randn(T, F), torch.randn(T, rd)
    sxg, sxu, bg, bu = torch.randn(T, rg), torch.randn(T, ru), torch.randn(F, rg), torch.randn(F, ru)
    sxa = torch.cat([_pad_cols(sxg, R), _pad_cols(sxu, R)], -1)
    dy, dsx, db, dat = swiglu_lora_bwd(y, dhb, _pad_cols(dsha, R), _pad_rows(a, R).contiguous(), sxa,
                                       _pad_cols(bg, R), _pad_cols(bu, R), block=(16, 32), toks=32, cols=64)
    ref = swiglu_lora_bwd_ref(y, dhb, dsha, a, sxg, sxu, bg, bu)
    out.update(dy=rel(dy, ref[0]), dsxa=rel(torch.cat([dsx[:, :rg], dsx[:, R:R + ru]], -1), ref[1]),
               dbg=rel(db[0, :, :rg], ref[2]), dbu=rel(db[1, :, :ru], ref[3]), da=rel(dat[:, :rd].t(), ref[4]),
               pad=float(max(dsx[:, rg:R].abs().max(), db[0, :, rg:].abs().max(), dat[:, rd:].abs().max())))
    x = torch.randn(6, 1000) * 3
    t = torch.randint(0, 1000, (6,))
    t[2] = -100
    inv = torch.tensor(0.2)
    l_ref, g_ref = chunk_loss_and_grad(x.double(), t, inv.double(), -100)
    buf = x.clone()
    l, g = ce_chunk_inplace(buf, t, inv, -100, block=256)
    out.update(ce_loss=abs(l.item() - l_ref.item()) / l_ref.item(), ce_grad=rel(g, g_ref),
               ce_inplace=float(g.data_ptr() == buf.data_ptr()), ce_ignored=float(g[2].abs().max()))
    # the custom ops' Triton branch (padding, slicing, torch.library's no-aliasing rule), rank 16
    import functools
    import lorakit.kernels as mlp  # the ops' dispatch
    import lorakit.kernels.triton_mlp as tm
    mlp.triton_for = lambda t: True
    tm.swiglu_lora_fwd = functools.partial(tm.swiglu_lora_fwd, block=(32, 32), cols=64)
    tm.swiglu_lora_bwd = functools.partial(tm.swiglu_lora_bwd, block=(32, 32), toks=64, cols=64)
    a16 = torch.randn(16, F)
    o, r = mlp.swiglu_lora_fwd(y, a16), swiglu_lora_fwd_ref(y, a16)
    out["op_fwd"] = max(rel(o[0], r[0]), rel(o[1], r[1]))
    args = (y, dhb, torch.randn(T, 16), a16, torch.randn(T, 16), torch.randn(T, 16), torch.randn(F, 16),
            torch.randn(F, 16))
    out["op_bwd"] = max(rel(o, r) for o, r in zip(mlp.swiglu_lora_bwd(*args), swiglu_lora_bwd_ref(*args)))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("h", "ha", "dy", "dsxa", "dbg", "dbu", "da", "ce_loss", "ce_grad", "op_fwd", "op_bwd"):
        assert out[key] < 1e-5, (key, out)
    assert out["ha_pad"] == 0.0 and out["pad"] == 0.0, out     # padded rank stays zero
    assert out["ce_inplace"] == 1.0 and out["ce_ignored"] == 0.0, out
