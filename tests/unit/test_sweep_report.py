"""The sweep report words itself from what was run and says when accuracy differences are within noise."""
import math

import pytest

from lorakit.lab.sweep import SweepOptions
from lorakit.lab.sweep_report import headline, report_md, rows, title, within_noise
from lorakit.train.evaluate import wilson


def test_wilson_interval():
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # the textbook values
    assert wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    lo, hi = wilson(48, 50)
    assert lo == pytest.approx(0.8655, abs=1e-3) and hi == pytest.approx(0.9890, abs=1e-3)
    # the interval is the set of p whose score test at 5% accepts k/n: both ends solve (k/n - p)^2 = z^2 p(1-p)/n
    for p in (lo, hi):
        assert (0.96 - p) ** 2 == pytest.approx(1.96 ** 2 * p * (1 - p) / 50, rel=1e-9)
    assert wilson(5, 0) == (0.0, 1.0)


def _result(name, kind, acc, n, r=None, targets=None, loss=0.1):
    return {"name": name, "kind": kind, "r": r, "targets": targets, "n_eval": n, "accuracy": acc, "eval_loss": loss,
            "trainable": 1000 * (r or 100), "total_params": 10 ** 6, "general_loss": 3.0, "peak_mib": 100.0}


def test_no_full_and_one_answer_apart_reads_as_noise():
    o = SweepOptions(data="d.jsonl", eval_data="e.jsonl", ranks=[4, 8], targets=["attn"], full=False, eval_rows=8)
    res = [_result("base", "base", 0.125, 8), _result("lora-attn-r4", "lora", 0.75, 8, 4, "attn", 0.2),
           _result("lora-attn-r8", "lora", 0.875, 8, 8, "attn", 0.1)]
    table = rows(res, None)
    text = report_md(o, table, None, 3, [])
    assert text.startswith("# LoRA sweep: rank\n")
    assert "full" not in text.lower().replace("--no-full", "")  # no full fine-tuning words anywhere
    assert "Best LoRA run" not in text and "No single best LoRA run" in text and "within noise" in text
    assert "one answer is 12 points" in text and "88% (53-98)" in text  # 7/8 and its Wilson interval


def test_best_only_beyond_noise_and_full_compared():
    o = SweepOptions(data="d.jsonl", eval_data="e.jsonl", ranks=[1, 8], targets=["attn", "all-linear"])
    res = [_result("base", "base", 0.08, 50), _result("full", "full", 0.92, 50),
           _result("lora-attn-r1", "lora", 0.40, 50, 1, "attn"), _result("lora-attn-r8", "lora", 0.96, 50, 8, "attn"),
           _result("lora-all-r1", "lora", 0.50, 50, 1, "all-linear"),
           _result("lora-all-r8", "lora", 0.60, 50, 8, "all-linear")]
    table = rows(res, None)
    assert title(o, table) == "# LoRA sweep: rank, target set and full fine-tuning"
    lines = headline(table)
    assert lines[0].startswith("- Best LoRA run: **lora-attn-r8**, accuracy 96% (87-99)")
    assert "within noise of the top LoRA run's" in lines[1]  # 92% vs 96% on 50 rows
    by = {t["name"]: t for t in table}
    assert within_noise(by["full"], by["lora-attn-r8"]) and not within_noise(by["lora-all-r8"], by["lora-attn-r8"])
    assert math.isclose(by["lora-attn-r8"]["accuracy_lo"], wilson(48, 50)[0])


def test_a_partial_sweep_with_one_lora_run_claims_no_comparison(tmp_path):
    o = SweepOptions(data="d.jsonl", eval_data="e.jsonl", ranks=[1, 2], targets=["attn"], full=False, eval_rows=8)
    res = [_result("base", "base", 0.0, 8), _result("lora-attn-r1", "lora", 0.0, 8, 1, "attn")]
    table = rows(res, None)
    text = report_md(o, table, None, 3, [], tmp_path / "sweep")
    assert "One LoRA run so far: **lora-attn-r1**" in text and "no other LoRA run to compare it with yet" in text
    assert "above every other" not in text and "from 0% (r=1) to 0% (r=1)" not in text
    assert "one rank done so far (r=1), accuracy 0%" in text
    assert f"-o {tmp_path / 'sweep'}" in text and "-o OUT" not in text
