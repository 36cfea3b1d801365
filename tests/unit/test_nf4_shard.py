"""The 4-bit base as FSDP shards it (core/nf4_shard.py): each NF4 weight's state laid into one flat frozen
parameter dequantizes to the same values bit for bit, in every storage dtype, keeps its bytes through
model.to(dtype), and changes neither the model's outputs nor its parameter counts. A base built on meta and
materialized weight by weight (train/shard_load.py) is the model load_base gives, adapters included."""
import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.core.inject import count_params
from lorakit.core.nf4 import NF4Weight, quantize_model, weight_bytes
from lorakit.core.nf4_shard import ALIGN, FlatNF4Weight, flatten_nf4, pack_state, unpack_state
from lorakit.models import tiny_llama


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_flat_weight_is_the_same_state_and_values(storage):
    w = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))  # 1073 values: no block divides it
    q = NF4Weight(w, "own")
    f = FlatNF4Weight(q, storage)
    assert f.flat.dtype == storage and f.flat.ndim == 1 and not f.flat.requires_grad
    assert list(f.state_dict()) == ["flat"] and not list(f.buffers())
    for k, t in q.state().items():
        assert f.state()[k].dtype == t.dtype and torch.equal(f.state()[k], t), k
    assert torch.equal(f.dequantize(), q.dequantize()) and f.nbytes() == q.nbytes()
    assert f.flat.numel() * f.flat.element_size() % ALIGN == 0
    f.to(torch.bfloat16)  # the compute dtype changes; the stored bytes do not
    assert f.flat.dtype == storage and f.dtype == torch.bfloat16
    assert torch.equal(f.dequantize(torch.float32), q.dequantize(torch.float32))


def test_unpack_copies_only_where_a_view_would_be_misaligned():
    state = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.tensor([1.5, -2.0]), "c": torch.tensor(7.0)}
    flat, layout = pack_state(state, torch.uint8)
    assert [o % ALIGN for *_, o, _ in layout] == [0, 0, 0]
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), flat])[1:]  # the same bytes at an odd address
    for got in (unpack_state(flat, layout), unpack_state(shifted, layout)):
        assert all(torch.equal(got[k], state[k]) and got[k].shape == state[k].shape for k in state)
    assert unpack_state(flat, layout)["b"].data_ptr() == flat.data_ptr() + layout[1][3]  # a view, no copy


def test_a_flattened_qlora_model_computes_and_counts_the_same():
    model = tiny_llama()
    quantize_model(model, "all-linear", lib="own")
    add_adapter(model, LoraConfig(r=4, targets="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    before, counts, nbytes = model(ids).logits, count_params(model), weight_bytes(model)
    assert flatten_nf4(model) == 2 * 7 and flatten_nf4(model) == 0  # every 4-bit linear, once
    assert torch.equal(model(ids).logits, before)
    assert count_params(model) == counts and weight_bytes(model)["quant_bytes"] >= nbytes["quant_bytes"]
    flat = [p for n, p in model.named_parameters() if n.endswith("weight.flat")]
    assert len(flat) == 14 and all(p.dtype == torch.float32 for p in flat)  # matched to the compute dtype


def test_a_meta_built_base_materialized_weight_by_weight_is_the_loaded_one(tiny_dir):
    """load_meta holds no parameter memory; after adapters and flattening, materialize (one process: every chunk
    is the whole) gives the adapters and the logits of load_base(quant='nf4') + add_adapter under the same seed."""
    from lorakit.models import load_base
    from lorakit.train.shard_load import load_meta, materialize, pending

    cfg = LoraConfig(r=4, targets="all-linear")
    ref, _ = load_base(str(tiny_dir), dtype="float32", device="cpu", quant="nf4")
    torch.manual_seed(3)
    add_adapter(ref, cfg)
    model, _ = load_meta(str(tiny_dir), torch.float32, torch.device("cpu"))
    nf4 = [m for m in model.modules() if isinstance(m, NF4Weight)]
    assert len(nf4) == 14 and all(b.is_meta for m in nf4 for b in m.buffers())
    assert all(p.is_meta for p in model.parameters())
    real = [b for m in model.modules() if not isinstance(m, NF4Weight) for b in m.buffers(recurse=False)]
    assert real and not any(b.is_meta for b in real)  # the rotary tables: computed, not on meta
    add_adapter(model, cfg)
    flatten_nf4(model)
    assert pending(model)
    assert materialize(model, seed=3) == 14 + 2 * 2 + 3  # the linears, the layers' norms, final norm, embedding, head
    assert not pending(model)
    want = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    for n, p in want.items():
        if "lora_B" in n:  # B starts at zero: give both models the same non-zero B so the adapters act
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
            got[n].data.copy_(p)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_the_checkpoint_reader_checks_shapes_and_draws_seeded_weights_where_marked(tiny_dir, tmp_path):
    """A real checkpoint: its tensors, and a shape the model does not expect named with its key. A directory
    marked lorakit_random_weights without weight files: the same draw for the same key on every call (every
    rank), another for another key, N(0, std) matrices and N(1, std) vectors."""
    import json
    import shutil

    from safetensors.torch import load_file

    from lorakit.train.shard_load import RANDOM_KEY, checkpoint_reader

    read = checkpoint_reader(tiny_dir, torch.device("cpu"))
    key = "model.layers.0.mlp.up_proj.weight"
    want = load_file(str(tiny_dir / "model.safetensors"))[key]
    assert torch.equal(read(key, tuple(want.shape)), want)
    with pytest.raises(ValueError, match="up_proj.weight: the checkpoint holds"):
        read(key, (want.shape[0], want.shape[1] + 1))
    d = tmp_path / "random"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, RANDOM_KEY: {"std": 0.02}}))
    draw = checkpoint_reader(d, torch.device("cpu"))
    a, b = draw(key, (256, 64)), checkpoint_reader(d, torch.device("cpu"))(key, (256, 64))
    assert torch.equal(a, b) and not torch.equal(a, draw("model.layers.1.mlp.up_proj.weight", (256, 64)))
    n = a.numel()  # mean within 5 standard errors, std within 5%
    assert abs(float(a.mean())) < 5 * 0.02 / n ** 0.5 and abs(float(a.std()) / 0.02 - 1) < 0.05
    assert abs(float(draw("model.norm.weight", (4096,)).mean()) - 1) < 5 * 0.02 / 4096 ** 0.5
    shutil.copy(tiny_dir / "model.safetensors", d / "model.safetensors")  # weights present: they are read
    assert torch.equal(checkpoint_reader(d, torch.device("cpu"))(key, tuple(want.shape)), want)
