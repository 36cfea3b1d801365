"""FSDP2's CPU offload on a GPU (issue 28, `lorakit train --offload params`), in a one-process group this test
makes (cuda:nccl beside cpu:gloo, as `distributed.init(offload=True)` makes it for torchrun): a 4-bit base built on
meta and read shard by shard (train/shard_load.py), LoRA r=16 on every linear, trained 4 steps with and without
offload. Offloading moves where the shards, their gradients and AdamW state live, not what is computed: the
losses and the adapter are the non-offloaded run's (bounds as tests/integration/test_distributed.py derives them),
and the GPU's allocated peak is lower by at least half of what the offloaded run keeps off the GPU."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lorakit.config import LoraConfig, TrainConfig
from lorakit.train.data import IGNORE, Example
from lorakit.train.loop import train
from lorakit.train.shard_load import load_meta

VOCAB, HIDDEN, LAYERS = 2048, 512, 8
STEPS = 4
TOL = 1e-5  # relative, fp32 losses (tests/integration/test_distributed.py)


def _model_dir(tmp_path) -> Path:
    """A random Llama whose weights outweigh its activations at 2 x 64 tokens (the saving is then visible)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1376, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    d = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(d)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                            pad_token="t0", eos_token="t1", bos_token="t2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def group():
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("cuda:nccl,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1, device_id=dev)
    yield
    dist.destroy_process_group()


def _examples():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 64), generator=g).tolist()
    return [Example(row, [IGNORE] * 8 + row[8:]) for row in ids]


def _run(path: Path, out: Path, offload: str, steps: int = STEPS, lr: float = 1e-2) -> dict:
    model, tok = load_meta(str(path), torch.float32, torch.device("cuda", 0))
    cfg = TrainConfig(lr=lr, max_steps=steps, batch_size=2, grad_accum=2, warmup_ratio=0.0, max_len=64,
                      backend="plain", parallel="fsdp", offload=offload, share_prefix=False)
    res = train(model, tok, _examples(), out, LoraConfig(r=16, alpha=32, targets="all-linear"), cfg,
                progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held = json.loads((out / "train_config.json").read_text())["sharded"]
    del model
    torch.cuda.empty_cache()
    return {"losses": [r["loss"] for r in rows], "peak": max(r["cuda_peak_alloc_gib"] for r in rows) * 2 ** 30,
            "held": held, "trainable": res.trainable, "adapter": load_file(str(out / "adapter_model.safetensors"))}


def test_offloaded_shards_train_the_same_with_a_lower_gpu_peak(group, tmp_path):
    path = _model_dir(tmp_path)
    plain = _run(path, tmp_path / "plain", "none")
    off = _run(path, tmp_path / "offload", "params")
    init = _run(path, tmp_path / "init", "none", steps=1, lr=1e-30)["adapter"]  # where training started
    assert off["held"]["offload"] and not plain["held"]["offload"]
    gaps = [abs(a - b) / abs(b) for a, b in zip(off["losses"], plain["losses"])]
    assert len(off["losses"]) == STEPS and max(gaps) < TOL, (off["losses"], plain["losses"])
    assert plain["losses"][-1] < plain["losses"][0]
    # each adapter tensor within a tenth of one step's share of how far training moved it
    moved = {k: float((off["adapter"][k] - plain["adapter"][k]).norm() / (plain["adapter"][k] - init[k]).norm())
             for k in plain["adapter"]}
    assert max(moved.values()) < 0.1 / STEPS, max(moved.items(), key=lambda kv: kv[1])
    # what the non-offloaded run keeps on the GPU and the offloaded one in host memory: every weight's shard (one
    # process: all of it) and the adapters' fp32 gradients and two AdamW states; the offloaded run may hold up to
    # two units' shards copied in beside their gathered copies (unit: the embedding or head, the largest here)
    kept_off = off["held"]["bytes_rank"] + 3 * 4 * off["trainable"]
    unit = VOCAB * HIDDEN * 4
    assert kept_off > 4 * unit  # the model is one whose weights matter
    assert plain["peak"] - off["peak"] >= (kept_off - 2 * unit) / 2, (plain["peak"], off["peak"], kept_off)
