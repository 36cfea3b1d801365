"""The Triton NF4 dequantization (kernels/triton_nf4.py) that core/nf4.py uses on CUDA writes bit for bit the
plain-torch path's weight (the same fp32 product, one rounding), at odd and llama-8b sizes, in fp32/bf16/fp16."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")


@pytest.mark.parametrize("shape", [(37, 45), (1024, 4096), (14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_dequantize_equals_the_torch_path(shape, dtype):
    from lorakit.core.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.02
    state = quantize_nf4(w)                                     # on the CPU: the reference path
    ref = dequantize_nf4(state, torch.Size(shape), dtype)
    got = dequantize_nf4({k: v.cuda() for k, v in state.items()}, torch.Size(shape), dtype)
    assert got.is_cuda and got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got.cpu(), ref)
    assert (ref.float() - w).abs().max() < 0.1 * w.abs().max()  # and it is the weight, to 4-bit precision
