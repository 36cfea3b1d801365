"""Packed rows on the GPU (issue 23): the compiled fast path with a FlexAttention document mask gives the padded
batch's loss and adapter gradients, and a run over rows of varying length compiles nothing after its warm-up.

Tolerance (fp32, TF32 off): the packed and padded forwards do the same sums over the same keys in another
order and tiling (FlexAttention vs SDPA kernels), so they differ by a few fp32 ulps of each value, grown by the
depth of the graph: loss within 1e-5 relative, each gradient tensor within 1e-4 of its largest entry.
"""
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, add_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(cfg).to("cuda", dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    return model


def rows(n=12, seed=0, lo=5, hi=200):
    from lorakit.train.data import IGNORE, Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, 512, (k,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (k // 3) + ids[k // 3:]))
    return out


def test_flex_packed_equals_padded_compiled_fp32():
    from lorakit.train import fast
    from lorakit.train.data import collate, pack

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = small_llama()
    fm = fast.prepare(base, compile=True, ce_kernel=False).train()
    assert fm.use_flex
    ex = rows()
    b = {k: v.cuda() for k, v in collate(ex, 0).items()}
    l1 = fm(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
    l1.backward()
    g1 = [p.grad.clone() for p in fm.trainable_parameters()]
    for p in fm.trainable_parameters():
        p.grad = None
    total = sum(len(e.input_ids) for e in ex)
    pk = pack(ex, 0, width=-(-total // 128) * 128)
    l2 = fm(pk["input_ids"].cuda(), labels=pk["labels"].cuda(), position_ids=pk["position_ids"].cuda(),
            seq_lens=pk["seq_lens"])
    l2.backward()
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l1.item())
    for a, p in zip(g1, fm.trainable_parameters()):
        assert float((a - p.grad).abs().max()) <= 1e-4 * float(a.abs().max()) + 1e-9


def test_no_recompile_after_warm_up(tmp_path):
    from torch._dynamo.utils import counters

    from lorakit import LoraConfig
    from lorakit.config import TrainConfig
    from lorakit.train.loop import train

    model = small_llama(torch.bfloat16)
    seen = {}

    def on_step(step, loss):
        seen[step] = sum(counters["frames"].values()), dict(counters["stats"])
    cfg = TrainConfig(batch_size=4, epochs=3, lr=1e-3, warmup_ratio=0.0, backend="fast")
    train(model, None, rows(40, seed=1, lo=5, hi=400), tmp_path, LoraConfig(r=4, alpha=8, targets="all-linear"),
          cfg, progress=False, save_final=False, on_step=on_step)
    last = max(seen)
    assert last == 30
    assert seen[1][0] == seen[last][0], (seen[1], seen[last])
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < sum(losses[:5])
