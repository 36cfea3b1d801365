"""bench/gpu_serve.py --dry-run: every case on a tiny model on the CPU (the engine eager, the real HTTP server and
openai client, PEFT), one JSON line per case whose numbers agree with each other."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import lorakit

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_serve.py")
ROWS, NEW, REQUESTS, SLOTS, ZIPF = 4, 8, 12, 4, 30


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def consistent_rate(r, tokens):
    """e2e_tok_s x total_s = tokens, up to the rounding of both (0.05 tokens/s and 0.0005 s)."""
    assert r["e2e_tok_s"] > 0 and r["total_s"] > 0, r
    assert abs(r["e2e_tok_s"] * r["total_s"] - tokens) <= 0.0005 * r["e2e_tok_s"] + 0.05 * r["total_s"] + 1e-6, r


def latencies(r):
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= 1e3 * r["total_s"] + 0.01, r
    assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"] <= 1e3 * r["total_s"] + 0.01, r
    assert 0 <= r["prefill_s"] <= r["total_s"] and r["decode_tok_s"] > 0, r


def ratio(a, b, nd):
    return round(a / b, nd)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The dry run in its own process (as the GPU round runs it): the server, the client and PEFT stay out of
    this one, whose later timing tests a garbage collection over their objects would disturb."""
    out = tmp_path_factory.mktemp("gs") / "s.jsonl"
    src = os.path.dirname(os.path.dirname(lorakit.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, BENCH, "--dry-run", "--rows", str(ROWS), "--prompt", "16", "--new", str(NEW),
                        "--cases", f"0,2,stack2-2,zipf-{ZIPF},http-2,peft-2", "--zipf-slots", str(SLOTS),
                        "--zipf-requests", str(REQUESTS), "--zipf-ref", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in got}, got


def test_one_line_per_case(rows):
    by_case, got = rows
    assert len(by_case) == len(got)
    assert set(by_case) == {"engine-0", "engine-2", "stack2-2", "zipf-ref-2", f"zipf-{ZIPF}", "http-2", "peft-2"}
    for r in got:
        assert r["shape"] == "tiny" and r["device"] == "cpu" and r["rows"] == ROWS and r["new"] == NEW, r
        assert r["copy_gbs"] is None and "error" not in r, r  # no copy rate (no bandwidth limit) on the CPU


def test_engine_and_stack_cases_against_the_base(rows):
    by_case, _ = rows
    base = by_case["engine-0"]
    for name in ("engine-0", "engine-2", "stack2-2"):
        r = by_case[name]
        assert r["api"] == "engine" and r["tokens"] == ROWS * NEW, r
        consistent_rate(r, ROWS * NEW)
        latencies(r)
    assert by_case["stack2-2"]["stack"] == 2 and by_case["stack2-2"]["adapters"] == 2
    for name in ("engine-2", "stack2-2"):
        assert by_case[name]["vs_base"] == ratio(by_case[name]["decode_tok_s"], base["decode_tok_s"], 3)
    assert by_case["engine-2"]["step_bytes"] > base["step_bytes"]  # the adapters' bytes are read too
    for name in ("engine-0", "engine-2"):  # the measured pass: prompts prefilled in batches, every adapter resident
        m = by_case[name]["measured"]
        assert 0 < m["prefills"] <= ROWS and m["prefill_splits"] == 0 and m["adapter_loads"] == 0, m
        assert m["prefill_s"] > 0 and m["acquire_s"] >= 0, m


def test_zipf_against_the_round_robin_reference(rows):
    by_case, _ = rows
    ref, z = by_case["zipf-ref-2"], by_case[f"zipf-{ZIPF}"]
    for r in (ref, z):
        assert r["requests"] == REQUESTS and r["slots"] == SLOTS and r["tokens"] == REQUESTS * NEW, r
        consistent_rate(r, REQUESTS * NEW)
        latencies(r)
        assert r["adapter_bytes"] > 0 and r["folder"] in ("tmpfs", "disk"), r
    assert ref["distinct"] == 2 and ref["loads"] == 0  # resident since the warm-up, never evicted
    assert z["adapters"] == ZIPF and 2 <= z["distinct"] <= min(REQUESTS, ZIPF)
    assert z["loads"] >= z["distinct"] - SLOTS and z["loads"] >= 1  # at most SLOTS were resident before
    assert 0 < z["load_ms_p50"] <= z["load_ms_p99"] <= z["load_ms_max"]
    assert 0 < z["read_ms_p50"] <= z["read_ms_p99"]
    assert z["vs_ref"] == ratio(z["e2e_tok_s"], ref["e2e_tok_s"], 3)


def test_http_case_through_the_openai_client(rows):
    by_case, _ = rows
    r = by_case["http-2"]
    assert r["api"] == "http" and r["client"] == "openai" and r["tokens"] == ROWS * NEW, r
    consistent_rate(r, ROWS * NEW)
    latencies(r)
    assert r["vs_engine"] == ratio(r["decode_tok_s"], by_case["engine-2"]["decode_tok_s"], 3)


def test_peft_peer(rows):
    by_case, _ = rows
    r = by_case["peft-2"]
    assert r["api"] == "peft" and r["new_tokens"] == NEW and r["load_s"] >= 0, r
    consistent_rate(r, ROWS * NEW)
    assert r["lorakit_x"] == ratio(by_case["engine-2"]["e2e_tok_s"], r["e2e_tok_s"], 2)


def test_shapes_have_llama_3_parameter_counts():
    """--shape llama-8b (and the default llama-1b) built on the meta device: Llama 3.1 8B's and Llama 3.2 1B's
    parameter counts exactly."""
    bench = load_bench()
    for shape, params in (("llama-8b", 8_030_261_248), ("llama-1b", 1_235_814_400)):
        model = bench.build_model(shape, torch.bfloat16, "meta", 776)
        assert sum(p.numel() for p in model.parameters()) == params, shape
        assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_cases_are_refused():
    bench = load_bench()
    assert bench.parse_cases("0,stack2-32,zipf-1000,http-8,peft-8") == [
        ("engine", 0), ("stack2", 32), ("zipf", 1000), ("http", 8), ("peft", 8)]
    for bad in ("stack2-1", "peft-0", "zipf", "foo-3"):
        with pytest.raises(SystemExit):
            bench.parse_cases(bad)
