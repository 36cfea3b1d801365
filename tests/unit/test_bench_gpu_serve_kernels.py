"""bench/gpu_serve_kernels.py --dry-run: tiny shapes on the CPU, reference only, one JSON line per case."""
import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_serve_kernels.py")


def test_dry_run_writes_one_json_line_per_case(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_serve_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "k.jsonl"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == printed and len(rows) == len(bench.CASES)
    assert {r["case"] for r in rows} == {"decode-0", "decode-1", "decode-8", "decode-32", "decode-32-stack2",
                                         "prefill-0", "prefill-1", "prefill-8", "prefill-32", "prefill-32-stack2"}
    for r in rows:
        assert r["ms_eager"] > 0 and r["impl"] == ("base" if r["adapters"] == 0 else "reference"), r
        assert r["rows"] * r["seq"] == (4 if r["mode"] == "decode" else 64), r
        if r["adapters"]:
            assert 0 < r["vs_base_eager"] and r["k"] in (1, 2), r
