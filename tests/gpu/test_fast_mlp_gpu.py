"""The Triton kernels of lorakit.train.fast on the GPU, at the llama-1b shapes, against the plain-torch
reference computed in float32 on the same (bf16) inputs: ||out - ref|| / ||ref|| under 1e-2 (bf16
operands), every output element written (the allocator is poisoned with NaN first)."""

import torch

from gpu_helpers import poison, record, rel

T, H, F, R = 16384, 2048, 8192, 16   # tokens (8 x 2048), hidden, MLP width, LoRA rank


def test_swiglu_lora_kernels_match_reference_at_1b_shape():
    from lorakit.kernels import swiglu_lora_bwd, swiglu_lora_fwd
    from lorakit.kernels.reference import swiglu_lora_bwd_ref, swiglu_lora_fwd_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, 2 * F, generator=g, **bf)
    a = torch.randn(R, F, generator=g, device="cuda") * 0.02                   # fp32, as the adapters
    poison(3 << 30)
    h, ha = swiglu_lora_fwd(y, a)
    torch.cuda.synchronize()
    hr, har = swiglu_lora_fwd_ref(y.float(), a)
    errs = {"h": rel(h, hr), "hA": rel(ha, har)}
    dhb = torch.randn(T, F, generator=g, **bf)
    dsha = torch.randn(T, R, generator=g, **bf)
    sxg, sxu = torch.randn(T, R, generator=g, **bf), torch.randn(T, R, generator=g, **bf)
    bg, bu = torch.randn(F, R, generator=g, device="cuda"), torch.randn(F, R, generator=g, device="cuda")
    poison(3 << 30)
    out = swiglu_lora_bwd(y, dhb, dsha, a, sxg, sxu, bg, bu)
    torch.cuda.synchronize()
    ref = swiglu_lora_bwd_ref(y.float(), dhb.float(), dsha.float(), a, sxg.float(), sxu.float(), bg, bu)
    for name, o, r in zip(("dy", "d_sxa", "dB_gate", "dB_up", "dA_down"), out, ref):
        assert o.shape == r.shape, (name, o.shape, r.shape)
        errs[name] = rel(o, r)
    errs["nan"] = float(sum(int(torch.isnan(t).sum()) for t in (h, ha, *out)))
    record("swiglu_lora", errs)
    print(errs)
    assert errs["nan"] == 0, errs
    assert all(v < 1e-2 for k, v in errs.items() if k != "nan"), errs


def test_inplace_loss_kernel_matches_reference_at_1b_vocab():
    from lorakit.kernels.reference import chunk_loss_and_grad
    from lorakit.kernels.triton_ce import ce_chunk_inplace

    c, V = 2048, 128256
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(c, V, generator=g, device="cuda") * 2).to(torch.bfloat16)
    t = torch.randint(0, V, (c,), generator=g, device="cuda")
    t[::7] = -100
    inv = 1.0 / (t != -100).sum().float()
    l_ref, g_ref = chunk_loss_and_grad(logits.float(), t, inv, -100)
    buf = logits.clone()
    loss, grad = ce_chunk_inplace(buf, t, inv, -100)
    torch.cuda.synchronize()
    errs = {"loss": abs(float(loss) - float(l_ref)) / abs(float(l_ref)), "grad": rel(grad, g_ref),
            "in_place": float(grad.data_ptr() == buf.data_ptr()),
            "ignored_rows_max": float(grad[::7].abs().max())}
    record("ce", errs)
    print(errs)
    assert errs["loss"] < 1e-5 and errs["grad"] < 1e-2, errs
    assert errs["in_place"] == 1.0 and errs["ignored_rows_max"] == 0.0, errs
