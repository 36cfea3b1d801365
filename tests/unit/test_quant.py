"""NF4 (QLoRA) base: the format against its definition and bitsandbytes, the 4-bit model, QLoRA training,
and moving a QLoRA adapter onto the full-precision base."""
import copy

import pytest
import torch
import torch.nn as nn

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter
from lorakit.core.inject import count_params, lora_layers
from lorakit.models import tiny_llama
from lorakit.core.nf4 import (BLOCK, NF4_LEVELS, SCALER_BLOCK, LoraNF4Linear, NF4Linear, check_platform,
                           dequantize_absmax, dequantize_model, dequantize_nf4, dynamic_map, nf4_levels_from_normal,
                           quantize_model, quantize_nf4, weight_bytes)
from lorakit.kernels import nf4_lib

NO_BNB = "bitsandbytes is optional (the test extra installs it; its CPU build runs this test)"


def test_levels_are_the_published_nf4_code_book():
    rebuilt = nf4_levels_from_normal()  # from N(0,1) quantiles, as defined in the QLoRA paper
    assert (rebuilt - torch.tensor(NF4_LEVELS, dtype=torch.float64)).abs().max() < 2e-7  # float32 rounding
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[15] == 1.0


def test_dynamic_map_is_the_signed_8bit_dynamic_type():
    m = dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32 and bool((m[1:] > m[:-1]).all())  # sorted, distinct
    assert m[-1] == 1.0 and (m == 0).sum() == 1 and (m > 0).sum() == 128 and (m < 0).sum() == 127
    # the largest magnitude of each decade: 10^(e-6) times the last midpoint of linspace(0.1, 1, 2^e + 1)
    for e in range(7):
        top = 10.0 ** (e - 6) * (1 - 0.9 / 2 ** (e + 1))
        assert (m - top).abs().min() <= 1e-7 * max(top, 1e-6) * 10


def test_roundtrip_error_nearest_level_and_bytes():
    torch.manual_seed(0)
    w = torch.randn(300, 203) * 0.02  # 60900 values: neither 64 nor 64*256 divides it (short last blocks)
    st = quantize_nf4(w)
    nb = -(-w.numel() // BLOCK)
    ns = -(-nb // SCALER_BLOCK)
    sizes = {k: (t.dtype, t.numel()) for k, t in st.items()}
    assert sizes == {"codes": (torch.uint8, -(-w.numel() // 2)), "absmax_q": (torch.uint8, nb),
                     "absmax_scale": (torch.float32, ns), "absmax_mean": (torch.float32, 1)}
    d = dequantize_nf4(st, w.shape, torch.float32)
    rel = ((d - w).norm() / w.norm()).item()
    assert 0.08 < rel < 0.095  # NF4 on Gaussian weights: ~9.2% (bitsandbytes: the same, see below)
    # every value took the nearest level of its block (up to the 8-bit absmax)
    blocks = torch.nn.functional.pad(w.flatten(), (0, nb * BLOCK - w.numel())).view(nb, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[((blocks / absmax)[..., None] - levels).abs().argmin(-1)] * absmax  # (nb, 64)
    dq_err = (d.flatten() - nearest.flatten()[: w.numel()]).abs()
    assert (dq_err <= absmax.repeat_interleave(BLOCK)[: w.numel()] * 0.01).all()  # only the absmax's 8-bit error
    # double quantization: the absmax constants took the nearest code of the dynamic map
    absmax_dq = dequantize_absmax(st)
    exact = absmax.flatten()
    c = exact - exact.mean()
    scale = st["absmax_scale"].repeat_interleave(SCALER_BLOCK)[:nb]
    best = (dynamic_map()[None, :] * scale[:, None] + st["absmax_mean"] - exact[:, None]).abs().amin(1)
    assert ((absmax_dq - exact).abs() <= best + 1e-6 * exact).all()
    half_gap = (dynamic_map()[1:] - dynamic_map()[:-1]).max() / 2  # 0.9/128: the top decade's half step
    assert ((absmax_dq - exact).abs() <= half_gap * scale * (1 + 1e-6)).all() and c.abs().max() > 0


def test_codes_and_dequantization_bit_identical_to_bitsandbytes():
    """The same state (4-bit codes, absmax codes, scales, mean) and the same dequantized values as bitsandbytes'
    own CPU kernels, for fp32, bf16 and fp16 weights and sizes that leave short last blocks. bitsandbytes' CPU
    kernel takes a neighbour of the nearest 8-bit absmax code on some blocks (an approximate lookup table): its
    state is then not ours, but each state dequantizes identically in both implementations."""
    bnbf = pytest.importorskip("bitsandbytes.functional", reason=NO_BNB)
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4_LEVELS))
    assert torch.equal(bnbf.create_dynamic_map(), dynamic_map())
    near = total = 0
    for shape, dt in [((256, 192), torch.float32), ((300, 203), torch.float32), ((1000, 517), torch.bfloat16),
                      ((512, 128), torch.float16), ((7,), torch.float32), ((64 * 256 * 3 + 64 * 5 + 17,), torch.bfloat16)]:
        # (not (512, 96): bitsandbytes' CPU dequantization blocks per row, see nf4_lib.bnb_exact)
        torch.manual_seed(sum(shape))
        w = (torch.randn(shape) * 0.05).to(dt)
        q, state = bnbf.quantize_4bit(w.clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quantize_nf4(w)
        assert torch.equal(q.flatten(), ours["codes"]), shape
        assert torch.equal(state.state2.absmax, ours["absmax_scale"]) and torch.equal(state.offset, ours["absmax_mean"])
        live = state.state2.absmax.repeat_interleave(SCALER_BLOCK)[: state.absmax.numel()] > 0  # (a lone block: 0)
        step = (state.absmax.int() - ours["absmax_q"].int()).abs()[live]
        assert step.numel() == 0 or step.max() <= 1  # at most a neighbouring code
        near, total = near + int((step == 1).sum()), total + step.numel()
        theirs_state = {"codes": q.flatten(), "absmax_q": state.absmax, "absmax_scale": state.state2.absmax,
                        "absmax_mean": state.offset}
        assert torch.equal(dequantize_nf4(theirs_state, w.shape, dt), bnbf.dequantize_4bit(q, state)), shape
        qs = nf4_lib.bnb_state(ours["absmax_q"], ours["absmax_scale"], ours["absmax_mean"], w.shape, dt)
        assert torch.equal(dequantize_nf4(ours, w.shape, dt), bnbf.dequantize_4bit(ours["codes"], qs)), shape
    assert near < 0.1 * total


def test_quantized_model_forward_bytes_and_dequantize(ids):
    m = tiny_llama()
    ref = m(ids).logits
    info = quantize_model(m)
    assert info["modules"] == 14 and isinstance(m.model.layers[0].mlp.up_proj, NF4Linear)
    assert type(m.lm_head) is nn.Linear  # the output head stays in full precision
    assert info["quant_bytes"] * 7.5 < info["dense_bytes"] < info["quant_bytes"] * 8  # 4.13 bits vs 32
    assert weight_bytes(m)["quant_bytes"] == info["quant_bytes"]
    out = m(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.2  # a random tiny model; the embedded model: see bench/results/quant_memory.jsonl
    m16 = copy.deepcopy(m).to(torch.bfloat16)  # a dtype cast changes the compute dtype only
    qw = m16.model.layers[0].mlp.up_proj.weight
    assert qw.dtype == torch.bfloat16 and qw.absmax_scale.dtype == torch.float32 and qw.codes.dtype == torch.uint8
    assert (m16(ids).logits.float() - out).abs().max() < 0.05 * out.abs().max()
    dequantize_model(m)
    assert type(m.model.layers[0].mlp.up_proj) is nn.Linear
    assert (m(ids).logits - out).abs().max() < 1e-5


def test_qlora_trains_and_adapter_moves_to_full_precision_base(tmp_path, ids):
    torch.manual_seed(0)
    q = tiny_llama()
    quantize_model(q)
    add_adapter(q, LoraConfig(r=8, alpha=16, targets="all-linear"))
    assert all(isinstance(layer, LoraNF4Linear) for _, layer in lora_layers(q))
    dense = tiny_llama()  # the report counts the 4-bit weights as the parameters they stand for
    add_adapter(dense, LoraConfig(r=8, alpha=16, targets="all-linear"))
    assert count_params(q) == count_params(dense)
    assert all(not t.requires_grad for n, t in q.named_parameters() if "adapters" not in n)
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):  # memorize one batch
        loss = q(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # ln(128) = 4.85 at the start
    save_adapter(q, tmp_path / "qlora")
    q2 = tiny_llama()
    quantize_model(q2)
    load_adapter(q2, tmp_path / "qlora")  # and back onto a 4-bit base: the same model
    assert torch.equal(q2(ids).logits, q(ids).logits)
    full = tiny_llama()
    base_loss = full(ids, labels=ids).loss.item()
    load_adapter(full, tmp_path / "qlora")
    full_loss = full(ids, labels=ids).loss.item()
    assert full_loss < base_loss - 0.9  # the adapter's effect survives on the full-precision base
    with torch.no_grad():
        gap = (full(ids).logits - q(ids).logits).norm() / q(ids).logits.norm()
    assert gap < 0.1  # logits differ by the base's quantization error only


def test_bad_4bit_requests_name_the_problem(tiny):
    with pytest.raises(ValueError, match="'mps'"):
        check_platform("mps", torch.float32)
    with pytest.raises(ValueError, match="float64"):
        check_platform("cpu", torch.float64)
    with pytest.raises(ValueError, match="'int3'.*nf4"):
        quantize_model(tiny, quant="int3")
    with pytest.raises(ValueError, match="float64"):
        quantize_model(tiny_llama(dtype=torch.float64))
    quantize_model(tiny, ["q_proj"])
    with pytest.raises(ValueError, match="q_proj' is already 4-bit"):
        quantize_model(tiny, ["q_proj"])
    add_adapter(tiny, LoraConfig(targets=["k_proj"]))
    with pytest.raises(ValueError, match="k_proj' is a LoraLinear"):
        quantize_model(tiny, ["k_proj"])
    with pytest.raises(ValueError, match="cannot merge an adapter into a 4-bit NF4 base"):
        add_adapter(tiny, LoraConfig(targets=["q_proj"]), "on4bit")
        from lorakit import merge

        merge(tiny)


def test_bf16_compute_dtype(ids):
    """The GPU default is bf16: the 4-bit base dequantizes into bf16, adapters are bf16, gradients flow."""
    q = tiny_llama(dtype=torch.bfloat16)
    quantize_model(q)
    add_adapter(q, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].lora_A.dtype == torch.bfloat16 and layer.base_weight().dtype == torch.bfloat16
    out = q(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    p = layer.adapters["default"]
    want = x.float() @ layer.weight.dequantize(torch.float32).T + p.scale * (x.float() @ p.lora_A.float().T) @ \
        p.lora_B.float().T
    assert (layer(x).float() - want).abs().max() < 0.02 * want.abs().max()
    q(ids, labels=ids).loss.backward()
    assert torch.isfinite(p.lora_B.grad.float()).all() and p.lora_B.grad.abs().sum() > 0
