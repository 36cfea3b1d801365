"""Training past one process (CPU, gloo, the tiny model): two processes train what one process trains at the same
global batch, with DDP and with FSDP2 (LoRA and full fine-tuning, and QLoRA: a 4-bit base sharded, its shards
offloaded to host memory or not, its adapters sharded or replicated); a run saved on two processes resumes on one
with the same next losses; one failing rank stops them all with its message."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.cli.main import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["--lr", "1e-2", "--warmup-ratio", "0", "--quiet"]
LORA = ["--r", "4", "--alpha", "8", "--targets", "all-linear", *COMMON]
TOL = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """21 pre-tokenized rows of 6-20 tokens (a prompt without loss, then targets), one row without any target:
    with 2 rows a rank, the last micro-batch of an epoch (1 row) leaves rank 1 without rows."""
    import random

    r = random.Random(0)
    rows = []
    for i in range(21):
        ids = [r.randint(3, 500) for _ in range(r.randint(6, 20))]
        p = r.randint(2, 5)
        labels = [ids[0]] + [-100] * (len(ids) - 1) if i == 5 else [-100] * p + ids[p:]  # row 5: nothing predicted
        rows.append({"input_ids": ids, "labels": labels})
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:5]))
    return d


def one_process(*args):
    assert main(["train", *map(str, args)]) == 0


def launch(cmd, timeout=240, **env):
    t0 = time.time()
    p = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**ENV, **env})
    return p, time.time() - t0


def torchrun(*args, script=("-m", "lorakit"), **env):
    return launch(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script, "--", *args],
                  **env)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path, key="loss") -> list[float]:
    return [r[key] for r in metrics(out) if key in r]


def assert_close(a: list[float], b: list[float]):
    assert len(a) == len(b) and a, (a, b)
    gaps = [abs(x - y) / abs(y) for x, y in zip(a, b)]
    assert max(gaps) < TOL, (a, b, gaps)


def init_adapter(args, out: Path) -> Path:
    """The adapter the run starts from: the same command for one step at lr 1e-30 (an update far below fp32's
    resolution of these weights; B moves from 0 to ~1e-30)."""
    args = list(args)
    i = args.index("--max-steps")
    args[i + 1] = "1"
    one_process(*args, "--lr", "1e-30", "--batch-size", "4", "-o", out)
    return out / "adapter_model.safetensors"


def assert_same_training(a: Path, b: Path, init: Path, steps: int):
    """Run a trained what run b trained: for every tensor, |a - b| is under a tenth of one step's share of how far
    training moved it, 0.1 * |b - init| / steps. A lost, repeated or mis-scheduled step, or a lost optimizer state,
    moves a tensor by about |b - init| / steps; rounding differences (another reduction order, amplified by Adam where
    a gradient is near zero) stay orders of magnitude below."""
    x, y, z = load_file(str(a)), load_file(str(b)), load_file(str(init))
    assert x.keys() == y.keys() and y.keys() <= z.keys()
    gaps = {k: float((x[k].float() - y[k].float()).norm() / (y[k].float() - z[k].float()).norm()) for k in x}
    assert max(gaps.values()) < 0.1 / steps, max(gaps.items(), key=lambda kv: kv[1])


def test_ddp_two_processes_train_what_one_does(tiny_dir, data, tmp_path):
    """`lorakit train --nproc 2`: DDP, fast backend (uncompiled on CPU) with recompute, 3 accumulated micro-batches,
    a micro-batch where rank 1 has no rows and a row without targets: the one-process curve and adapter."""
    args = ["--model", tiny_dir, "--data", data / "train.jsonl", *LORA, "--backend", "fast", "--recompute", "1",
            "--grad-accum", "3", "--max-steps", "4"]
    one_process(*args, "--batch-size", "4", "-o", tmp_path / "one")
    p, _ = launch(["-m", "lorakit", "train", *args, "--batch-size", "2", "--parallel", "ddp", "--nproc", "2",
                   "-o", tmp_path / "two"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert len(metrics(tmp_path / "two")) == 4  # one writer
    assert_same_training(tmp_path / "two" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors",
                         init_adapter(args, tmp_path / "init"), steps=4)
    cfg = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert (cfg["world"], cfg["parallel"], cfg["batch_size_per_rank"], cfg["train"]["batch_size"]) == (2, "ddp", 2, 4)
    assert cfg["backend"] == "fast"


def test_fsdp_full_fine_tuning_two_processes_train_what_one_does(tiny_dir, data, tmp_path):
    """`torchrun -m lorakit train --parallel fsdp --full`: every weight sharded, recompute, 2 accumulated
    micro-batches, periodic eval: the same losses, eval losses and saved model."""
    args = ["--model", tiny_dir, "--data", data / "train.jsonl", *COMMON, "--full", "--lr", "1e-3", "--recompute", "all",
            "--grad-accum", "2", "--max-steps", "4", "--eval-data", data / "eval.jsonl", "--eval-every", "2"]
    one_process(*args, "--batch-size", "4", "-o", tmp_path / "one")
    p, _ = torchrun("train", *args, "--batch-size", "2", "--parallel", "fsdp", "-o", tmp_path / "two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_close(losses(tmp_path / "two", "eval_loss"), losses(tmp_path / "one", "eval_loss"))
    assert len(losses(tmp_path / "one", "eval_loss")) == 2  # step 2 and the end
    assert_same_training(tmp_path / "two" / "model.safetensors", tmp_path / "one" / "model.safetensors",
                         Path(tiny_dir) / "model.safetensors", steps=4)


def test_failing_rank_stops_all_and_the_fsdp_run_resumes_on_one_process(tiny_dir, data, tmp_path):
    """FSDP LoRA (fast backend), checkpoint every 2 steps; rank 1 fails at step 4: torchrun stops both ranks and
    the rank's message is printed; the step-2 checkpoint resumes on one process (twice the per-rank batch) with the
    uninterrupted run's next losses and final adapter."""
    args = ["--model", tiny_dir, "--data", data / "train.jsonl", *LORA, "--backend", "fast", "--max-steps", "6",
            "--save-every", "2"]
    one_process(*args, "--batch-size", "4", "-o", tmp_path / "one")
    p, secs = torchrun("train", *args, "--batch-size", "2", "--parallel", "fsdp", "-o", tmp_path / "two",
                       script=[ROOT / "tests" / "integration" / "fail_rank.py"], FAIL_RANK="1", FAIL_AT="3")
    assert p.returncode != 0
    assert "lorakit train: error: rank 1: injected failure at micro-batch 3" in p.stderr
    assert "ChildFailedError" in p.stderr and secs < 120  # torchrun stopped rank 0 too (no hang)
    assert json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one")[:3])  # what ran on 2 processes
    one_process(*args, "--batch-size", "4", "-o", tmp_path / "two", "--resume")
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_same_training(tmp_path / "two" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors",
                         init_adapter(args, tmp_path / "init"), steps=6)


QLORA = ["--quantize", "nf4", *LORA, "--recompute", "all", "--grad-accum", "2", "--max-steps", "4", "--save-every",
         "2", "--threads", "1"]  # one thread a process: two on this shared 2-core machine run slower


@pytest.fixture(scope="module")
def qlora_one(tiny_dir, data, tmp_path_factory):
    """The one-process QLoRA run both FSDP tests compare with, and the adapter it starts from."""
    args = ["--model", tiny_dir, "--data", data / "train.jsonl", *QLORA]
    out = tmp_path_factory.mktemp("qlora")
    one_process(*args, "--batch-size", "4", "-o", out / "one")
    return out / "one", init_adapter(args, out / "init")


def qlora_fsdp(tiny_dir, data, out: Path, *options: str) -> Path:
    """`lorakit train --nproc 2 --parallel fsdp --quantize nf4` with the one-process run's global batch -> out."""
    p, _ = launch(["-m", "lorakit", "train", "--model", tiny_dir, "--data", data / "train.jsonl", *QLORA,
                   "--batch-size", "2", "--parallel", "fsdp", "--nproc", "2", *options, "-o", out])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def qlora_two(tiny_dir, data, tmp_path_factory):
    """The two-process FSDP QLoRA run, adapters sharded (the default), shards on the device."""
    return qlora_fsdp(tiny_dir, data, tmp_path_factory.mktemp("qlora2") / "two")


def test_fsdp_qlora_shards_the_4bit_base_and_two_processes_train_what_one_does(qlora_one, qlora_two):
    """`lorakit train --nproc 2 --parallel fsdp --quantize nf4`: the base is built on meta and each rank reads and
    quantizes only its shards; each holds half of every 4-bit weight's bytes (FSDP2 shards the flat NF4 storage)
    and the two ranks train the one-process curve and adapter (recompute, 2 accumulated micro-batches, a
    micro-batch where rank 1 has no rows)."""
    one, init = qlora_one
    assert_close(losses(qlora_two), losses(one))
    assert_same_training(qlora_two / "adapter_model.safetensors", one / "adapter_model.safetensors", init, steps=4)
    cfg = json.loads((qlora_two / "train_config.json").read_text())
    assert (cfg["world"], cfg["parallel"]) == (2, "fsdp")
    held = cfg["sharded"]
    assert (held["offload"], held["adapter_state"], held["replicated_bytes"]) == (False, "shard", 0)
    assert held["nf4_weights"] == 2 * 7  # every linear of the 2 decoder layers (all-linear keeps the head dense)
    assert held["read_shard_by_shard"] == 14 + 2 * 2 + 3  # built on meta, every weight read after sharding
    # 1/2 of each flat weight, up to one padding element of at most 4 bytes each
    assert held["nf4_bytes"] / 2 <= held["nf4_bytes_rank"] <= held["nf4_bytes"] / 2 + 4 * held["nf4_weights"]
    assert held["bytes_rank"] < 0.51 * held["bytes"]  # the rest too (embedding, head, norms, adapters)


def test_fsdp_qlora_killed_on_two_processes_resumes_on_one(tiny_dir, data, qlora_one, tmp_path):
    """Both ranks killed (SIGKILL) in step 3, after the step-2 checkpoint: the run resumes on one process (twice
    the per-rank batch) with the uninterrupted run's next losses and final adapter."""
    killed_in_step_3_then_resumed_on_one(tiny_dir, data, qlora_one, tmp_path / "two")


def killed_in_step_3_then_resumed_on_one(tiny_dir, data, qlora_one, out, *fsdp_args):
    """Two FSDP ranks (with `fsdp_args`) killed in step 3: the step-2 checkpoint is there with the one-process run's
    first losses, and resuming it on one process (twice the per-rank batch) gives that run's losses and adapter."""
    one, init = qlora_one
    args = ["--model", tiny_dir, "--data", data / "train.jsonl", *QLORA]
    p, _ = torchrun("train", *args, "--batch-size", "2", "--parallel", "fsdp", *fsdp_args, "-o", out,
                    LORAKIT_FAULT="train.micro_batch@5:kill")
    assert p.returncode != 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert_close(losses(out), losses(one)[:2])
    one_process(*args, "--batch-size", "4", "-o", out, "--resume")
    assert_close(losses(out), losses(one))
    assert_same_training(out / "adapter_model.safetensors", one / "adapter_model.safetensors", init, steps=4)


def test_fsdp_qlora_replicated_adapters_train_what_one_process_and_sharded_adapters_do(tiny_dir, data, qlora_one,
                                                                                       qlora_two, tmp_path):
    """--adapter-state replicate: the LoRA tensors are FSDP's ignored parameters, whole on both ranks (AdamW state
    too), their gradients all-reduced once a step; the 4-bit base is sharded as before. The one-process curve and
    adapter, and the sharded-adapter run's."""
    one, init = qlora_one
    two = qlora_fsdp(tiny_dir, data, tmp_path / "two", "--adapter-state", "replicate")
    assert_close(losses(two), losses(one))
    assert_close(losses(two), losses(qlora_two))
    for ref in (one, qlora_two):
        assert_same_training(two / "adapter_model.safetensors", ref / "adapter_model.safetensors", init, steps=4)
    held = json.loads((two / "train_config.json").read_text())["sharded"]
    adapter = sum(t.numel() * 4 for t in load_file(str(init)).values())  # fp32 masters, whole on each rank
    assert (held["adapter_state"], held["replicated_bytes"]) == ("replicate", adapter)
    assert held["nf4_bytes"] / 2 <= held["nf4_bytes_rank"] <= held["nf4_bytes"] / 2 + 4 * held["nf4_weights"]
    dense = held["bytes"] - held["nf4_bytes"] - adapter  # embedding, head, norms: still halved
    assert held["bytes_rank"] - held["nf4_bytes_rank"] - adapter < 0.51 * dense


def test_fsdp_qlora_offloaded_shards_train_what_one_process_does(tiny_dir, data, qlora_one, tmp_path):
    """--offload params (FSDP2's CPUOffloadPolicy, unpinned on CPU processes): the shards, their gradients and AdamW
    state in host memory; AdamW steps on the sharded adapters there. The one-process curve and adapter."""
    one, init = qlora_one
    two = qlora_fsdp(tiny_dir, data, tmp_path / "two", "--offload", "params")
    assert_close(losses(two), losses(one))
    assert_same_training(two / "adapter_model.safetensors", one / "adapter_model.safetensors", init, steps=4)
    held = json.loads((two / "train_config.json").read_text())["sharded"]
    assert (held["offload"], held["adapter_state"]) == (True, "shard")


def test_fsdp_qlora_replicated_offloaded_run_killed_resumes_on_one(tiny_dir, data, qlora_one, tmp_path):
    """Replicated adapters and offloaded shards together, both ranks killed in step 3: the step-2 checkpoint (whole
    adapters from rank 0, no gather) resumes on one process with the uninterrupted run's next losses and adapter."""
    killed_in_step_3_then_resumed_on_one(tiny_dir, data, qlora_one, tmp_path / "two", "--adapter-state", "replicate",
                                         "--offload", "params")
