"""The GPU result tables in docs/serving.md (scripts/serve_table.py) and docs/gpu.md round 5
(scripts/gpu_data_table.py) equal what their scripts generate from the committed result files, and a changed
number in a result file changes the table."""
import json
from pathlib import Path

from script_files import load

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "bench/results/gpu_serve_h200_2026-12-05.jsonl"
DATA = ROOT / "bench/results/gpu_train_data_h200_2026-12-05.jsonl"


def _between(text: str, begin: str, end: str) -> str:
    return text.split(begin)[1].split(end)[0].strip("\n")


def test_serving_table_matches_and_follows_the_file(tmp_path):
    st = load("scripts/serve_table.py")
    doc = st.DOC.read_text()
    body = lambda rows: st.table(rows) + "\n\n" + st.goals(rows)  # noqa: E731  (what main writes)
    rows = st.read([str(SERVE)])
    assert _between(doc, "<!-- gpu-serve:r1:begin -->", "<!-- gpu-serve:r1:end -->") == body(rows), \
        "docs/serving.md drifted: python scripts/serve_table.py bench/results/gpu_serve_h200_2026-12-05.jsonl --write"
    changed = [json.loads(x) for x in SERVE.read_text().splitlines()]
    engine32 = next(r for r in changed if r["case"] == "engine-32")
    engine32["vs_base"] = 0.95  # the goal line flips to met, the table row changes
    f = tmp_path / SERVE.name
    f.write_text("".join(json.dumps(r) + "\n" for r in changed))
    new = body(st.read([str(f)]))
    assert new != body(rows)
    assert "| 32 mixed adapters, decode x base-only | 0.95 | 0.90 | yes | 0.84 |" in new


def test_real_data_table_matches_and_follows_the_file(tmp_path):
    gt = load("scripts/gpu_data_table.py")
    doc = (ROOT / "docs/gpu.md").read_text()
    rows = gt.read([str(DATA)])
    assert _between(doc, "<!-- gpu-data:r5:begin -->", "<!-- gpu-data:r5:end -->") == gt.table(rows), \
        "docs/gpu.md drifted: python scripts/gpu_data_table.py ... --write docs/gpu.md --name r5"
    changed = [json.loads(x) for x in DATA.read_text().splitlines()]
    changed[1]["tokens_per_s"] *= 2
    f = tmp_path / DATA.name
    f.write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert gt.table(gt.read([str(f)])) != gt.table(rows)


def test_qlora_round_table_matches_and_follows_the_file(tmp_path):
    tt = load("scripts/gpu_tables.py")
    f = ROOT / "bench/results/gpu_qlora_h100_2026-12-05.jsonl"
    doc = (ROOT / "docs/gpu.md").read_text()
    rows = tt.read([str(f)])
    assert _between(doc, "<!-- gpu-table:r5q:begin -->", "<!-- gpu-table:r5q:end -->") == tt.table(rows), \
        "docs/gpu.md drifted: python scripts/gpu_tables.py ... --write docs/gpu.md --name r5q"
    changed = [json.loads(x) for x in f.read_text().splitlines()]
    changed[1]["peak_gib"] += 1.0
    g = tmp_path / f.name
    g.write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert tt.table(tt.read([str(g)])) != tt.table(rows)


def test_second_round_tables_match_their_files_and_keep_traced_runs_out_of_the_speed_table():
    """docs/serving.md r2 and docs/gpu.md r6 are what their scripts make of the 2026-12-06 files; in gpu.md the runs
    that recorded their allocations (slowed by it) are only in the memory table, and the compiled 32-adapter row
    is put against the compiled base-only row of its file."""
    st, gt = load("scripts/serve_table.py"), load("scripts/gpu_data_table.py")
    serve = st.read([str(ROOT / "bench/results/gpu_serve_h100_2026-12-06.jsonl")])
    doc = st.DOC.read_text()
    assert _between(doc, "<!-- gpu-serve:r2:begin -->", "<!-- gpu-serve:r2:end -->") == \
        st.table(serve) + "\n\n" + st.goals(serve)
    base = next(r for r in serve if r["case"] == "engine-0" and r.get("decode_compile"))
    e32 = next(r for r in serve if r["case"] == "engine-32")
    assert f"{e32['decode_tok_s'] / base['decode_tok_s']:.2f}x base-only engine (compiled step" in st.table(serve)
    rows = gt.read([str(ROOT / "bench/results/gpu_train_data_h100_2026-12-06.jsonl")])
    gdoc = (ROOT / "docs/gpu.md").read_text()
    assert _between(gdoc, "<!-- gpu-data:r6:begin -->", "<!-- gpu-data:r6:end -->") == gt.body(rows)
    speed, mem = gt.table(rows), gt.mem_table(rows)
    traced = [r for r in rows if r.get("mem_trace")]
    assert len(traced) == 2 and all(f"{r['tokens_per_s']:,.0f}" not in speed for r in traced)
    assert all(f"{r['peak_alloc_gib']:.3f} / {r['mem_trace']['peak_gib']:.3f}" in mem for r in traced)


def test_kernel_and_qlora_repeat_tables_match_their_files_and_follow_them(tmp_path):
    """docs/serving.md k1 (scripts/kernel_table.py) and docs/gpu.md r6q (scripts/gpu_tables.py) are what their
    scripts make of the 2026-12-06 files; rows the QLoRA round skipped at its deadline are not in the table, and a
    changed time in the kernel file changes the kernel table."""
    kt, tt = load("scripts/kernel_table.py"), load("scripts/gpu_tables.py")
    kf = ROOT / "bench/results/gpu_serve_kernels_h100_2026-12-06.jsonl"
    rows = kt.read([str(kf)])
    assert _between(kt.DOC.read_text(), "<!-- gpu-kernels:k1:begin -->", "<!-- gpu-kernels:k1:end -->") == \
        kt.table(rows), "docs/serving.md drifted: python scripts/kernel_table.py ... --write --name k1"
    grouped = next(r for r in rows if r["case"] == "decode-32" and r["impl"].startswith("grouped["))
    assert f"| decode-32 | grouped[{grouped['impl'][8:-1]}] | {grouped['ms_graph']:.4f} |" in kt.table(rows)
    changed = [json.loads(x) for x in kf.read_text().splitlines()]
    changed[-1]["ms_graph"] *= 2
    g = tmp_path / kf.name
    g.write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert kt.table(kt.read([str(g)])) != kt.table(rows)
    qf = ROOT / "bench/results/gpu_qlora_h100_2026-12-06.jsonl"
    q = tt.read([str(qf)])
    assert _between((ROOT / "docs/gpu.md").read_text(), "<!-- gpu-table:r6q:begin -->",
                    "<!-- gpu-table:r6q:end -->") == tt.table(q)
    skipped = [json.loads(x) for x in qf.read_text().splitlines() if "skipped" in json.loads(x)]
    assert len(skipped) == 3 and tt.table(q).count("\n") == 1 + sum(1 for r in q if r.get("tokens_per_s"))


def test_h200_chat_rows_table_matches_its_file_and_shows_the_deadline_row():
    """docs/gpu.md r7 is what scripts/gpu_data_table.py makes of the H200 2026-12-06 file: the amb=0.9 run is
    labelled as such, and the default run the deadline skipped is shown as skipped, not dropped."""
    gt = load("scripts/gpu_data_table.py")
    rows = gt.read([str(ROOT / "bench/results/gpu_train_data_h200_2026-12-06.jsonl")])
    body = gt.body(rows)
    assert _between((ROOT / "docs/gpu.md").read_text(), "<!-- gpu-data:r7:begin -->", "<!-- gpu-data:r7:end -->") == body
    amb = next(r for r in rows if r.get("variant", {}).get("amb") == "0.9")
    assert f"packed (amb=0.9) | {amb['tokens_per_s']:,.0f} |" in body and "| deadline |" in body
