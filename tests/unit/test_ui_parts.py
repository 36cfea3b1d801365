"""The dashboard's pieces without a server: Markdown escaping, run and sweep lookup (no path traversal),
the chart's coordinates, keys and sessions."""
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("starlette")

from lorakit.ui import markdown, runs as R, sweeps as S  # noqa: E402
from lorakit.ui.render import fmt_num  # noqa: E402
from lorakit.ui.session import ADMIN, ANON, USER, Sessions, key_level, safe_next  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_markdown_escapes_everything_and_keeps_structure():
    text = ("# Title <script>alert(1)</script>\n\nA **bold** *word* and `<b>code</b>` "
            "[x](javascript:alert(1)) [ok](https://example.org/?a=1&b=\"2\")\n\n"
            "| a | <img src=x onerror=alert(1)> |\n|---|---|\n| 1 | 2 |\n\n"
            "![plot](p.png) ![evil](../../etc/passwd.png)\n\n```\n<script>x()</script>\n```\n\n> quoted <i>\n\n- one\n- two")
    html = markdown.render(text, lambda src: "/plots/p.png" if src == "p.png" else None)
    assert "<script>" not in html and "<img src=x" not in html and "<b>code</b>" not in html and "<i>" not in html
    assert html.count("&lt;script&gt;") == 2 and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h1>Title &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>word</em>" in html and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert 'href="javascript' not in html and "x" in html
    assert '<a href="https://example.org/?a=1&amp;b=&quot;2&quot;" rel="noopener noreferrer">ok</a>' in html
    assert html.count("<img ") == 1 and '<img src="/plots/p.png" alt="plot">' in html and "[evil]" in html
    assert "<th>a</th>" in html and "<td>1</td><td>2</td>" in html
    assert "<blockquote><p>quoted &lt;i&gt;</p></blockquote>" in html and "<ul><li>one</li><li>two</li></ul>" in html


def test_markdown_renders_the_committed_sweep_report():
    text = (REPO / "docs/sweep/report.md").read_text()
    html = markdown.render(text, lambda src: f"/p/{src}" if src.endswith(".png") else None)
    assert html.count("<img ") == 4 and html.count("<table>") == 3 and html.count("<pre><code>") == 1
    assert html.count("<tr>") == 1 + 11 + 1 + 8 + 1 + 7  # header + rows of each table


def _run(d: Path, records: list[dict], done: bool = False, tail: str = "") -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    (d / "train_config.json").write_text(json.dumps({"total_steps": 10}))
    if done:
        (d / "train_done.json").write_text("{}")
    return d


def test_runs_listing_status_and_half_written_line(tmp_path):
    recs = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 0.5}]
    _run(tmp_path / "a", recs, done=True)
    _run(tmp_path / "b", recs[:2], tail='{"step": 3, "lo')  # the trainer is writing this line
    old = _run(tmp_path / "c", recs[:1])
    os.utime(old / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))
    (tmp_path / "not-a-run").mkdir()
    runs = {r.name: r for r in R.list_runs(tmp_path)}
    assert set(runs) == {"a", "b", "c"}
    assert (runs["a"].status, runs["b"].status, runs["c"].status) == ("done", "running", "stopped")
    assert [r["step"] for r in runs["b"].steps] == [1, 2] and runs["a"].last("eval_loss") == 0.5
    assert runs["a"].total_steps() == 10
    for bad in ("../a", "a/..", "..", "/etc", "not-a-run", ""):
        with pytest.raises(FileNotFoundError):
            R.find_run(tmp_path, bad)
    assert R.find_run(tmp_path, "a").path == tmp_path / "a"


def test_chart_maps_points_into_the_plot_box():
    c = R.chart({"loss": [(1, 4.0), (3, 2.0), (5, 0.5)], "eval_loss": [(5, 1.5)]})
    # y from 0 (the curve falls most of the way) to 4 plus 6% headroom: y=4 -> 1 - 4/4.24
    assert c["lines"][0]["points"] == "0.0,56.6 500.0,528.3 1000.0,882.1"
    assert c["lines"][1]["dots"] == [(1000.0, 646.2)] and c["lines"][1]["n"] == 1
    assert [label for _, label in c["xticks"]] == ["1", "2", "3", "4", "5"]  # whole steps only
    assert [label for _, label in c["yticks"]] == ["0", "2", "4"]
    lg = R.chart({"loss": [(1, 100.0), (2, 1.0), (3, 0.0)]}, log_y=True)  # 0 has no log: dropped
    assert lg["lines"][0]["points"] == "0.0,56.6 1000.0,1000.0" and [t for _, t in lg["yticks"]] == ["1", "10", "100"]
    assert R.chart({"loss": []})["empty"]
    assert R.nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0] and R.nice_ticks(1, 30, integer=True) == [10, 20, 30]
    assert R.nice_ticks(1, 3, integer=True) == [1, 2, 3]


def test_sweep_plots_only_listed_png_inside_the_dir(tmp_path):
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "report.md").write_text("# A sweep\n")
    (sw / "loss.png").write_bytes(b"\x89PNG")
    (sw / "notes.txt").write_text("x")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (sw / "link.png").symlink_to(tmp_path / "secret.png")  # a link out of the sweep dir is not served
    assert S.sweep_dirs(tmp_path) == {"sw": sw} and S.plots(sw) == ["loss.png"]
    assert S.plot_path(sw, "loss.png") == sw / "loss.png"
    for bad in ("../secret.png", "link.png", "notes.txt", "/etc/passwd", "..", "loss.png/..", ""):
        with pytest.raises(FileNotFoundError):
            S.plot_path(sw, bad)
    for bad in ("..", "../sw", "sw/..", "sw/../sw"):
        with pytest.raises(FileNotFoundError):
            S.find_sweep(tmp_path, bad)
    assert S.find_sweep(sw, "sw") == sw  # the dir given is itself a sweep
    assert S.summary("sw", sw)["title"] == "A sweep"


def test_keys_sessions_and_redirects():
    assert key_level("admin", ["k1", "k2"], "admin") == ADMIN
    assert key_level(" k2 ", ["k1", "k2"], "admin") == USER
    assert key_level("k3", ["k1", "k2"], "admin") == ANON and key_level("", [], None) == ANON
    assert key_level("admin", ["k1"], None) == ANON
    store = Sessions(ttl_s=100, max_sessions=3)
    made = [store.new(USER) for _ in range(5)]
    assert len(store) == 3 and len({s.sid for s in made}) == 5 and len({s.csrf for s in made}) == 5
    assert len(made[0].sid) >= 40
    assert safe_next("/ui/runs/a%20b?scale=log") == "/ui/runs/a%20b?scale=log"
    for bad in ("https://evil.example/", "//evil.example/ui/", "/admin/adapters", "/ui/\\evil", None, "javascript:x"):
        assert safe_next(bad) == "/ui/adapters"


def test_number_format():
    assert [fmt_num(v) for v in (1234567, 0.012345678, 14637.2, 3.0, None, "x")] == \
        ["1,234,567", "0.01235", "14,637", "3", "", "x"]


def test_every_page_passes_the_one_login_gate():
    """Each GET page under /ui (not the login page, the static files or the redirects to a page) depends on
    UI.viewer, the one login gate, rather than checking the session itself; the listings render through one macro."""
    from fastapi import FastAPI

    from lorakit.ui import UIState, mount

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    ui = mount(app, UIState(None, ["k"], None, "base"))
    open_pages = {"/", "/ui", "/ui/login", "/ui/static/{name}"}
    pages = [r for r in app.routes if "GET" in getattr(r, "methods", ()) and r.path not in open_pages]
    assert len(pages) == 9, [r.path for r in pages]
    for r in pages:
        assert any(d.call == ui.viewer for d in r.dependant.dependencies), r.path
    templates = REPO / "src/lorakit/ui/templates"
    for name in ("adapters.html", "runs.html", "sweeps.html"):
        text = (templates / name).read_text()
        assert "{% call data_table(" in text and "<table" not in text, name


def test_login_throttle_per_client_and_overall(monkeypatch):
    """Failed logins over a sliding window: 5 from one address, 20 from everyone; waits say when the oldest
    failure leaves the window."""
    from lorakit.ui import session

    now = [1000.0]
    monkeypatch.setattr(session.time, "monotonic", lambda: now[0])
    t = session.LoginThrottle(per_client=5, overall=20, window_s=60)
    for _ in range(5):
        assert t.wait_s("1.2.3.4") == 0
        t.failed("1.2.3.4")
    assert t.wait_s("1.2.3.4") == 60 and t.wait_s("5.6.7.8") == 0  # that address alone is held back
    for i in range(15):
        t.failed(f"10.0.0.{i}")
    assert t.wait_s("9.9.9.9") == 60  # 20 failures from everyone: every address waits
    now[0] += 30
    assert t.wait_s("9.9.9.9") == 30
    now[0] += 30.5
    assert t.wait_s("9.9.9.9") == 0 and t.wait_s("1.2.3.4") == 0
