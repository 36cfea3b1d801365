"""lorakit sweep end to end on a tiny model: runs in subprocesses, a killed sweep resumes at the unfinished run,
and the CSV, report and plots hold the numbers."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli_forks

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def sweep_args(tiny_dir, out, *extra):
    return [sys.executable, "-m", "lorakit", "sweep", "--model", str(tiny_dir),
            "--data", str(ROOT / "data/demo/train.jsonl"), "--eval-data", str(ROOT / "data/demo/test.jsonl"),
            "--general", str(ROOT / "data/general/general.jsonl"), "--ranks", "1,2", "--targets", "attn",
            "--steps", "4", "--batch-size", "4", "--lr", "5e-3", "--full-lr", "1e-3", "--train-rows", "16",
            "--eval-rows", "6", "--general-rows", "3", "--max-new-tokens", "4", "--threads", "1", "--quiet",
            "-o", str(out), *extra]


def run_sweep(tiny_dir, out, *extra):
    p = cli_forks.run(sweep_args(tiny_dir, out, *extra)[3:], ENV, timeout=900)  # a process of its own
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def steps_logged(run_dir: Path) -> int:
    m = run_dir / "train" / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


@pytest.mark.slow
def test_sweep_resumes_after_a_kill_and_reports_numbers(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    runs = out / "runs"
    run_sweep(tiny_dir, out, "--max-runs", "2")  # base, full
    assert sorted(p.name for p in runs.iterdir()) == ["base", "full"]
    stamps = {n: (runs / n / "result.json").stat().st_mtime_ns for n in ("base", "full")}

    # kill the whole sweep (orchestrator and its run) once lora-attn-r1 has trained one step: the run kills its
    # process group when it reaches micro-batch 1 (lorakit/faults.py)
    p = cli_forks.run(sweep_args(tiny_dir, out)[3:], {**ENV, "LORAKIT_FAULT": "train.micro_batch@1:killpg"},
                      timeout=900)  # in a session of its own: the kill takes the sweep and its run, nothing else
    assert p.returncode == -9, p.stdout + p.stderr
    assert steps_logged(runs / "lora-attn-r1") >= 1, "the run never started training"
    assert not (runs / "lora-attn-r1" / "result.json").exists()

    text = run_sweep(tiny_dir, out)
    assert "4/4 runs done" in text
    assert {n: (runs / n / "result.json").stat().st_mtime_ns for n in stamps} == stamps  # not redone
    assert all((runs / n / "result.json").exists() for n in ("lora-attn-r1", "lora-attn-r2"))

    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["base", "full", "lora-attn-r1", "lora-attn-r2"]
    # tiny_llama, 2 layers: q (64->64), k (64->32), v (64->32), o (64->64): r * 448 per layer
    assert int(rows["lora-attn-r1"]["trainable_params"]) == 2 * 448
    assert int(rows["lora-attn-r2"]["trainable_params"]) == 2 * 2 * 448
    full = json.loads((runs / "full" / "result.json").read_text())
    assert int(rows["full"]["trainable_params"]) == full["total_params"] > 10 ** 6
    for name in ("full", "lora-attn-r1", "lora-attn-r2"):
        r, res = rows[name], json.loads((runs / name / "result.json").read_text())
        assert len(res["losses"]) == 4 and sum(res["losses"][-2:]) / 2 < res["losses"][0]  # it learned
        assert float(r["peak_mib"]) > res["weights_mib"] > 0 and float(r["predicted_peak_mib"]) > 0
        assert float(r["train_seconds"]) > 0 and float(r["tokens_per_s"]) > 0 and float(r["file_mib"]) > 0
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["answers_changed"]) <= 1
        assert float(r["kl"]) > 0 and float(r["eval_loss"]) > 0
        base = json.loads((runs / "base" / "result.json").read_text())
        assert float(r["forgetting"]) == pytest.approx(res["general_loss"] - base["general_loss"], rel=1e-4, abs=1e-6)
    assert float(rows["full"]["file_mib"]) > 100 * float(rows["lora-attn-r2"]["file_mib"])
    e1, e2 = float(rows["lora-attn-r1"]["full_ft_energy_at_r"]), float(rows["lora-attn-r2"]["full_ft_energy_at_r"])
    assert 0 < e1 < e2 <= 1

    analysis = json.loads((runs / "full" / "analysis.json").read_text())
    assert len(analysis["modules"]) == 14
    for m in analysis["modules"]:
        assert all(a <= b + 1e-9 for a, b in zip(m["energy"], m["energy"][1:])) and m["energy"][-1] > 0.99

    report = (out / "report.md").read_text()
    assert "4 of 4 runs done" in report and "| lora-attn-r2 |" in report and "lorakit sweep" in report
    assert "The low-rank hypothesis, measured" in report
    for png in ("quality_vs_rank.png", "cost_vs_rank.png", "loss_curves.png", "svd_energy.png"):
        assert f"]({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_sweep_refuses_bad_options_and_foreign_directories(tmp_path, capsys):
    from lorakit.cli.main import main
    from lorakit.lab.sweep import SweepOptions, run_sweep

    data = str(ROOT / "data/demo/train.jsonl")
    assert main(["sweep", "--data", str(tmp_path / "nope.jsonl"), "--eval-data", data, "-o", str(tmp_path)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["sweep", "--data", data, "--eval-data", data, "--ranks", "0,4", "-o", str(tmp_path)]) == 2
    assert "ranks must be positive" in capsys.readouterr().err
    assert main(["sweep", "--data", data, "--eval-data", data, "--ranks", "4,x", "-o", str(tmp_path)]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["sweep", "--data", data, "-o", str(tmp_path)]) == 2
    assert "--eval-data is required" in capsys.readouterr().err

    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({**SweepOptions(data=data, eval_data=data).__dict__, "steps": 99}))
    with pytest.raises(ValueError, match=r"other options \(differing: \['steps'\]\)"):
        run_sweep(SweepOptions(data=data, eval_data=data), out, progress=False)
    assert not (out / "runs").exists()  # nothing was started


@pytest.mark.slow
def test_one_sweep_per_directory(tmp_path):
    from lorakit.lab.sweep import SweepOptions, _Lock, run_sweep

    data = str(ROOT / "data/demo/train.jsonl")
    o = SweepOptions(data=data, eval_data=data)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process (pytest's parent) holds the directory
    with pytest.raises(ValueError, match=rf"another sweep \(pid {os.getppid()}\) is running"):
        run_sweep(o, tmp_path, progress=False)
    assert not (tmp_path / "runs").exists()
    (tmp_path / ".lock").write_text(dead.stdout.strip())  # left by a killed sweep: taken over
    with _Lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
