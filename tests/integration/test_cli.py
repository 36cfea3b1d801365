"""The CLI end to end on a tiny local model: train -> inspect -> eval -> generate -> merge, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_forks

ROOT = Path(__file__).resolve().parents[2]


def lorakit(*args, check=True, fault=None):
    """`lorakit ARGS` as a process of its own (forked from cli_forks' server, which paid the imports once);
    `fault` (LORAKIT_FAULT, lorakit/faults.py) makes it fail at a named point."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("LORAKIT_FAULT", None)
    if fault:
        env["LORAKIT_FAULT"] = fault
    p = cli_forks.run([str(a) for a in args], env)
    if check and p.returncode != 0:
        raise AssertionError(f"lorakit {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Say the word {w}.", "completion": w} for w in
            ["apple", "river", "stone", "cloud", "maple", "ember", "frost", "delta"] * 4]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return d


@pytest.fixture(scope="module")
def trained(tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ad"
    p = lorakit("train", "--model", tiny_dir, "--data", data / "train.jsonl", "--eval-data", data / "test.jsonl",
                "--r", 8, "--alpha", 16, "--targets", "all-linear", "--lr", 5e-3, "--max-steps", 30,
                "--batch-size", 8, "-o", out)
    assert "done: 30 steps" in p.stdout
    assert "backend: plain (device is cpu" in p.stderr  # auto says which backend and why
    quiet = lorakit("train", "--model", tiny_dir, "--data", data / "train.jsonl", "--max-steps", 2, "--quiet",
                    "-o", out.parent / "quiet")
    assert quiet.stdout == "" and "backend" not in quiet.stderr and "train:" not in quiet.stderr
    return out


def test_train_writes_peft_adapter_and_loss_falls(trained):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["target_modules"] == "all-linear"
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(json.loads(line).get("backend", "plain") == "plain"
               for line in (trained / "metrics.jsonl").read_text().splitlines())


def test_inspect(trained):
    info = json.loads(lorakit("inspect", trained, "--json").stdout)
    assert info["ranks"] == [8] and info["modules"] == 14 and info["base_architecture"] == "LlamaForCausalLM"
    assert info["params"] == sum(8 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128),
                                                        (64, 128), (128, 64)]) * 2


def test_eval_reports_before_after_and_behaviour_change(tiny_dir, trained, data, tmp_path):
    lorakit("eval", "--model", tiny_dir, "--adapter", trained, "--data", data / "test.jsonl", "--json",
            tmp_path / "r.json", "--max-new-tokens", 4)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["after"]["loss"] < rep["before"]["loss"]
    assert rep["after"]["accuracy"] > rep["before"]["accuracy"]
    assert rep["kl_to_base"] > 0 and 0 < rep["answers_changed"] <= 1


def test_generate_with_and_without_adapter(tiny_dir, trained):
    with_ad = lorakit("generate", "--model", tiny_dir, "--adapter", trained, "--chat", "--prompt",
                      "Say the word maple.", "--max-new-tokens", 4).stdout.strip()
    base = lorakit("generate", "--model", tiny_dir, "--chat", "--prompt", "Say the word maple.",
                   "--max-new-tokens", 4).stdout.strip()
    assert base != with_ad
    from lorakit import load_adapter, load_base
    from lorakit.generate import generate

    model, tok = load_base(str(tiny_dir), device="cpu")
    load_adapter(model, trained)
    assert with_ad == generate(model, tok, [[{"role": "user", "content": "Say the word maple."}]], 4)[0].strip()


def test_merge_exports_a_model_transformers_loads_alone(tiny_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import load_adapter, load_base

    lorakit("merge", "--model", tiny_dir, "--adapter", trained, "-o", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k or "adapters" in k for k in merged.state_dict())
    model, _ = load_base(str(tiny_dir), device="cpu")
    load_adapter(model, trained)
    ids = torch.tensor([[5, 60, 700, 9000, 33]])
    assert (merged(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_resume_after_sigkill_gives_the_uninterrupted_curve(tiny_dir, data, tmp_path):
    """kill -9 once steps 0-11 are done (at micro-batch 12; the last checkpoint is step 10): --resume gives the
    uninterrupted run's losses."""
    args = ["train", "--model", tiny_dir, "--data", data / "train.jsonl", "--max-steps", 40, "--batch-size", 4,
            "--dropout", 0.1, "--save-every", 5, "--quiet"]
    lorakit(*args, "-o", tmp_path / "ref")
    ref = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    p = lorakit(*args, "-o", tmp_path / "cut", check=False, fault="train.micro_batch@12")
    assert p.returncode == -9, p.stderr[-2000:]
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    assert json.loads(state.read_text())["step"] == 10 and not (tmp_path / "cut" / "train_done.json").exists()
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 12
    lorakit(*args, "-o", tmp_path / "cut", "--resume")
    got = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)
    assert lorakit(*args, "-o", tmp_path / "cut", "--resume", check=False).returncode == 2  # finished: nothing to do


@pytest.mark.parametrize("args,msg", [
    (["--r", 0], "r=0"),
    (["--targets", "nope_proj"], "unknown target module 'nope_proj'"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_clear_errors_and_nothing_written(tiny_dir, data, tmp_path, args, msg):
    base = {"--data": data / "train.jsonl", "--r": 4, "--targets": "q_proj"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    p = lorakit("train", "--model", tiny_dir, *flat, "--max-steps", 2, "--quiet", "-o", tmp_path / "out", check=False)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    p = lorakit("eval", "--model", "embedded", "--adapter", trained, "--data", "x.jsonl", check=False)
    assert p.returncode == 2
    # the data file is checked first; with real data the base mismatch names module and shapes
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    p = lorakit("generate", "--model", "embedded", "--adapter", trained, "--prompt", "hi", check=False)
    assert p.returncode == 2 and "another base" in p.stderr and "(64, 64)" in p.stderr and "(576, 576)" in p.stderr


# (where the kill lands, the step of the whole checkpoint a resume then starts from, and whether it still lies
# aside because the kill came between the two renames that put a new one in place)
KILLS = [("models.load", None, False),             # start-up: nothing written yet
         ("train.micro_batch@5", 4, False),        # between steps
         ("checkpoint.written@6", 4, False),       # step 6's checkpoint complete in its temp folder
         ("checkpoint.swapped@8", 6, True),        # step 6's moved aside, step 8's not yet in place
         ("models.load", 6, True),                 # start-up of a resume, before it recovers anything
         ("train.micro_batch@9", 8, False),
         ("checkpoint.swapped@12", 10, True),
         ("checkpoint.written@12", 10, False),
         ("train.micro_batch@15", 14, False),
         ("checkpoint.swapped@16", 14, True)]


def whole_checkpoint(out: Path):
    """(step, aside) of the checkpoint a resume would use: checkpoint/, or the one moved aside when a kill came
    between the two renames; None when there is none. Its tensors must read back."""
    from safetensors.torch import load_file

    ck, aside = out / "checkpoint", False
    if not ck.exists():
        olds = list(out.glob(".checkpoint.old-*"))
        if not olds:
            return None
        assert len(olds) == 1, olds
        ck, aside = olds[0], True
    assert load_file(str(ck / "state.safetensors"))
    return json.loads((ck / "state.json").read_text())["step"], aside


def test_ten_kills_during_training_lose_nothing(tiny_dir, data, tmp_path):
    """kill -9 at ten named points of one run (start-up, between steps, a checkpoint complete but not in place, between
    the two renames that replace a checkpoint): every time the output holds the expected whole checkpoint and no
    finished marker; resuming after the last kill gives the uninterrupted loss curve exactly and an adapter equal
    to the uninterrupted one."""
    from safetensors.torch import load_file

    args = ["train", "--model", tiny_dir, "--data", data / "train.jsonl", "--max-steps", 24, "--batch-size", 4,
            "--save-every", 2, "--quiet"]
    lorakit(*args, "-o", tmp_path / "ref")
    ref = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "cut"
    for trial, (fault, step, aside) in enumerate(KILLS):
        p = lorakit(*args, "-o", out, *(["--resume"] if trial else []), check=False, fault=fault)
        assert p.returncode == -9, (fault, p.stderr[-2000:])
        assert not (out / "train_done.json").exists()
        assert whole_checkpoint(out) == (None if step is None else (step, aside)), fault
    lorakit(*args, "-o", out, "--resume")
    assert not [p for p in out.glob(".*") if ".tmp-" in p.name or ".old-" in p.name]  # resume tidied what kills left
    got = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
