"""The pieces of distributed training that need no process group: each rank's share of a global micro-batch,
the parallel mode chosen and refused (and FSDP's options where they cannot apply), the run identity a checkpoint
compares, the layers FSDP shards."""
import pytest
import torch

from lorakit.config import TrainConfig
from lorakit.core.nf4 import quantize_model
from lorakit.models import tiny_llama
from lorakit.train.data import IGNORE, Example
from lorakit.train.distributed import Context, choose_parallel, echo, place_model
from lorakit.train.fsdp import shard_units
from lorakit.train.batches import MicroBatches


def _examples(n):
    g = torch.Generator().manual_seed(0)
    return [Example(ids := torch.randint(3, 100, (int(torch.randint(4, 12, (1,), generator=g)),),
                                         generator=g).tolist(), [IGNORE] + ids[1:]) for _ in range(n)]


@pytest.mark.parametrize("group", [False, True])
def test_ranks_split_each_global_micro_batch_of_one_process(group):
    ex = _examples(21)  # 21 rows, 3 a rank: the last micro-batch of an epoch has 3 rows for 2 ranks
    one = MicroBatches(ex, 6, 0, 0, group, unit=12)
    ranks = [MicroBatches(ex, 3, 0, 0, group, unit=12, rank=r, world=2) for r in range(2)]
    assert one.per_epoch == ranks[0].per_epoch == 4
    for m in range(9):  # over an epoch boundary
        rows = [tuple(x) for x in one.get(m)["input_ids"].tolist()]
        parts = [rb.get(m) for rb in ranks]
        got = [tuple(x[:int(n)]) for p in parts for x, n in zip(p["input_ids"].tolist(), p["attention_mask"].sum(1))]
        assert [r[:len(g)] for r, g in zip(rows, got)] == got and len(got) == len(rows)
        assert ranks[0].indices(m) == one.indices(m)
        assert sum(ranks[0].targets[j] for j in one.indices(m)) == int((one.get(m)["labels"][:, 1:] != IGNORE).sum())


def test_a_rank_without_rows_gets_one_row_without_targets():
    ex = _examples(5)  # 4 rows a global micro-batch: micro-batch 1 has 1 row, which goes to rank 1
    none, one = (MicroBatches(ex, 2, 0, 0, rank=r, world=2).get(1) for r in range(2))
    assert none["input_ids"].shape[0] == one["input_ids"].shape[0] == 1
    assert bool((none["labels"] == IGNORE).all()) and int((one["labels"] != IGNORE).sum()) > 0


def test_parallel_modes_chosen_and_refused():
    model = tiny_llama()
    assert choose_parallel("fsdp", model, Context()) == ("none", "one process")
    # a one-process group a caller made (tests/gpu: CPU offload on one GPU): FSDP only where asked for
    one_group = Context(device=torch.device("cpu"), group=True)
    assert choose_parallel("fsdp", model, one_group) == ("fsdp", "asked for, in a one-process group")
    assert choose_parallel("auto", model, one_group) == ("none", "one process")
    two = Context(world=2, device=torch.device("cpu"))
    assert choose_parallel("auto", model, two)[0] == "ddp"
    assert choose_parallel("fsdp", model, two) == ("fsdp", "asked for")
    with pytest.raises(ValueError, match="parallel must be one of"):
        choose_parallel("zero3", model, two)
    with pytest.raises(ValueError, match="parallel must be auto, ddp or fsdp"):
        TrainConfig(parallel="zero3")
    quantize_model(model, "all-linear")
    assert choose_parallel("auto", model, two)[0] == "ddp"
    assert choose_parallel("fsdp", model, two) == ("fsdp", "asked for")  # a 4-bit base shards too (core/nf4_shard)


@pytest.mark.parametrize("mode,offload,state,full,error", [
    ("none", "params", "shard", False, "--offload params moves FSDP2's shards to host memory: it needs --parallel "
                                       "fsdp on several processes (torchrun / --nproc), this run is one process"),
    ("ddp", "params", "shard", False, "this run is DDP (every rank holds the whole model)"),
    ("none", "none", "replicate", False, "--adapter-state replicate chooses how FSDP2 holds the adapters: it needs "
                                         "--parallel fsdp on several processes, this run is one process"),
    ("ddp", "none", "replicate", False, "this run is DDP"),
    ("fsdp", "none", "replicate", True, "--full trains every weight and FSDP shards them all"),
])
def test_fsdp_options_refused_where_they_cannot_apply(mode, offload, state, full, error):
    model = tiny_llama()
    ctx = Context() if mode == "none" else Context(world=2, device=torch.device("cpu"))
    with pytest.raises(ValueError) as e:
        place_model(model, mode if mode != "none" else "auto", ctx, offload=offload, adapter_state=state, full=full)
    assert error in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="offload must be none or params"):
        TrainConfig(offload="disk")
    with pytest.raises(ValueError, match="adapter_state must be shard or replicate"):
        TrainConfig(adapter_state="mirror")


def test_the_run_identity_is_the_global_micro_batch():
    """2 ranks x 2 rows and 1 process x 4 rows are the same run (a checkpoint of one resumes as the other), whatever
    the placement (FSDP or not, offloaded or not, adapters sharded or replicated)."""
    a = echo(TrainConfig(batch_size=2, parallel="fsdp", offload="params", adapter_state="replicate").to_dict(),
             Context(world=2, device=torch.device("cpu")))
    b = echo(TrainConfig(batch_size=4).to_dict(), Context())
    assert a == b and a["batch_size"] == 4 and not {"parallel", "offload", "adapter_state"} & set(a)


def test_fsdp_shards_the_decoder_layers():
    model = tiny_llama()
    assert shard_units(model) == [*model.model.layers, model.model.embed_tokens, model.lm_head]
    with pytest.raises(ValueError, match="no decoder layer classes"):
        shard_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("backend", ["plain", "fast"])
def test_a_rank_without_targets_still_runs_forward_and_backward_with_zero_weight(backend):
    """Every rank must join the collectives of each micro-batch: a micro-batch without targets (here one row of
    one token, which predicts nothing) still runs, and adds exactly zero to the loss and the gradients."""
    from lorakit import LoraConfig, add_adapter
    from lorakit.train.backends import choose_backend
    from lorakit.train.distributed import Runner

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, targets="all-linear", init_lora_weights=False))
    be, _ = choose_backend(model, backend)
    runner = Runner(model, be, "none", Context(world=2, device=torch.device("cpu")))
    batch = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
             "labels": torch.tensor([[5]]), "n_targets": 0, "unpadded": True}
    loss = runner.loss(batch, 7.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert float(loss) == 0.0 and grads and all(g is not None and not g.abs().sum() for g in grads)
