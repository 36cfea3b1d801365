"""The dashboard over real HTTP (uvicorn on loopback, httpx as the browser) on a tiny random Llama:
login and its cookie, CSRF and origin checks on every POST, admin-only actions, the Compare stream
(equal to the API's answer), escaping, security headers, and no path traversal into the disk."""
import json
import re
from pathlib import Path

import httpx
import pytest

pytest.importorskip("jinja2")

from lorakit import LoraConfig, load_adapter  # noqa: E402
from lorakit.adapters.mixtures import add_mixture, write_mixture  # noqa: E402
from lorakit.core.mixture import Router  # noqa: E402
from lorakit.adapters.peft_files import fingerprint  # noqa: E402
from lorakit.adapters.registry import Registry  # noqa: E402
from lorakit.config import ServeConfig  # noqa: E402
from lorakit.models import load_base  # noqa: E402
from lorakit.serve.app import ServerThread, build_app, make_state  # noqa: E402
from lorakit.ui import UIOptions  # noqa: E402
from serve_helpers import save_noisy_adapter, tiny_base  # noqa: E402

pytestmark = pytest.mark.slow
KEY, ADMIN = "sk-ui-key", "sk-ui-admin"
XSS = "<script>window.__xss=1</script>"
PNG = b"\x89PNG\r\n\x1a\n fake plot bytes"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    tiny_base(root)
    model, tok = load_base(str(root / "base"), device="cpu")
    for i, n in enumerate(("a1", "a2", "b", "c")):
        save_noisy_adapter(model, root / n, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                                       init_lora_weights=False), i)
    reg = Registry(root / "reg.sqlite", base_fp=fingerprint(model), base_name="tiny")
    reg.add("a", root / "a1", description="first " + XSS)
    reg.add("a", root / "a2")
    reg.add("b", root / "b")
    reg.add("c", root / "c")
    mixer, _ = load_base(str(root / "base"), device="cpu")  # a mixture over a@2 and b (a router, untrained)
    for n, d in (("a", "a2"), ("b", "b")):
        load_adapter(mixer, root / d, n, activate=False)
    write_mixture(root / "mix", Router(mixer, ["a", "b"]), {"a": root / "a2", "b": root / "b"}, fingerprint(mixer),
                  "tiny")
    add_mixture(reg, "ab", root / "mix")
    runs = root / "runs"
    for name in ("r1", "<img src=x onerror=alert(1)>"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 3.0 / s, "tokens_per_s": 10.0}) + "\n" for s in (1, 2, 3)))
    sweeps = root / "sweeps"
    (sweeps / "sw").mkdir(parents=True)
    (sweeps / "sw" / "report.md").write_text(f"# Sweep {XSS}\n\n![plot](p.png)\n")
    (sweeps / "sw" / "p.png").write_bytes(PNG)
    (sweeps / "secret.png").write_bytes(b"\x89PNG secret")
    (sweeps / "sw" / "link.png").symlink_to(sweeps / "secret.png")
    cfg = ServeConfig(api_keys=[KEY], admin_key=ADMIN, max_slots=2, max_batch=4, max_new_tokens=32)
    state = make_state(model, tok, reg, cfg, "tiny")
    server = ServerThread(build_app(state, UIOptions(runs_dir=runs, sweeps_dir=sweeps))).start()
    yield dict(url=server.url, reg=reg, runs=runs, root=root)
    server.stop()
    state.engine.stop()
    reg.close()


def browser(env) -> httpx.Client:
    return httpx.Client(base_url=env["url"], follow_redirects=False, timeout=60)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def login(env, key: str) -> tuple[httpx.Client, str]:
    c = browser(env)
    token = csrf_of(c.get("/ui/login").text)
    r = c.post("/ui/login", data={"key": key, "csrf": token, "next": "/ui/adapters"})
    assert r.status_code == 303, r.text
    return c, csrf_of(c.get("/ui/adapters").text)


def test_pages_need_a_login(env):
    c = browser(env)
    assert c.get("/").headers["location"] == "/ui/adapters"
    for path in ("/ui/adapters", "/ui/adapters/a", "/ui/compare", "/ui/runs", "/ui/runs/r1", "/ui/runs/r1/chart",
                 "/ui/sweeps", "/ui/sweeps/sw", "/ui/sweeps/sw/plots/p.png"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/login?next={path}", path
    r = c.post("/ui/api/complete", json={"model": "base", "prompt": "hi"})
    assert r.status_code == 403


def test_login_cookie_is_httponly_strict_and_renewed(env):
    c = browser(env)
    r = c.get("/ui/login")
    first = r.cookies["lorakit_session"]
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    r = c.post("/ui/login", data={"key": KEY, "csrf": csrf_of(r.text), "next": "/ui/runs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/runs"
    second = r.cookies["lorakit_session"]
    assert second != first and len(second) >= 40
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/ui/adapters").status_code == 200
    stale = httpx.get(env["url"] + "/ui/adapters", cookies={"lorakit_session": first})
    assert stale.status_code == 303  # the pre-login session id was not upgraded
    r = c.post("/ui/login", data={"key": KEY, "csrf": "x", "next": "https://evil.example/"})
    assert r.status_code == 403
    r = c.post("/ui/login", data={"key": KEY, "csrf": csrf_of(c.get("/ui/login").text), "next": "https://evil.example/"})
    assert r.headers["location"] == "/ui/adapters"  # no open redirect


def test_login_refuses_wrong_key_missing_token_and_other_origins(env):
    c = browser(env)
    token = csrf_of(c.get("/ui/login").text)
    r = c.post("/ui/login", data={"key": "sk-wrong", "csrf": token})
    assert r.status_code == 401 and "Wrong key" in r.text and c.get("/ui/adapters").status_code == 303
    assert c.post("/ui/login", data={"key": KEY}).status_code == 403
    assert c.post("/ui/login", data={"key": KEY, "csrf": token + "x"}).status_code == 403
    assert c.post("/ui/login", data={"key": KEY, "csrf": token},
                  headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/ui/login", data={"key": KEY, "csrf": token}, headers={"Origin": "null"}).status_code == 403
    assert c.post("/ui/login", content=json.dumps({"key": KEY, "csrf": token}),
                  headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.post(env["url"] + "/ui/login", data={"key": KEY, "csrf": token}).status_code == 403  # no cookie
    assert c.get("/ui/adapters").status_code == 303  # none of these logged in
    r = c.post("/ui/login", data={"key": KEY, "csrf": token}, headers={"Origin": env["url"]})
    assert r.status_code == 303 and c.get("/ui/adapters").status_code == 200


def test_admin_actions_need_the_admin_key_and_the_token(env):
    reg = env["reg"]
    user, utoken = login(env, KEY)
    assert "Make current" not in user.get("/ui/adapters/a").text
    assert user.post("/ui/adapters/a/rollback", data={"csrf": utoken, "version": "1"}).status_code == 403
    admin, atoken = login(env, ADMIN)
    assert admin.post("/ui/adapters/a/rollback", data={"version": "1"}).status_code == 403
    assert admin.post("/ui/adapters/a/rollback", data={"csrf": utoken, "version": "1"}).status_code == 403
    assert reg.resolve("a").version == 2  # nothing changed so far
    r = admin.post("/ui/adapters/a/rollback", data={"csrf": atoken, "version": "1"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/adapters/a"
    assert reg.resolve("a").version == 1
    page = admin.get("/ui/adapters/a").text
    assert "version 1 is now current" in page and '<strong id="current-version">v1</strong>' in page
    r = admin.post("/ui/adapters/a/rollback", data={"csrf": atoken, "version": "9"})
    assert "has no version 9" in admin.get(r.headers["location"]).text and reg.resolve("a").version == 1
    assert user.post("/ui/adapters/c/remove", data={"csrf": utoken}).status_code == 403
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(env["url"] + "/v1/completions", headers=auth, json={"model": "c", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    c_sha = reg.resolve("c").sha256
    assert "c@1" in httpx.get(env["url"] + "/health").json()["engine"]["resident"]  # c holds a slot
    assert admin.post("/ui/adapters/c/remove", data={"csrf": atoken}).headers["location"] == "/ui/adapters"
    assert "c@1" not in httpx.get(env["url"] + "/health").json()["engine"]["resident"]  # and gave it back
    assert not reg.find_sha(c_sha)
    assert [v.name for v in reg.list()] == ["a", "b", "mix:ab"]
    api = httpx.get(env["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "c" not in {m["id"] for m in api["data"]}


def _sse_text(body: str) -> tuple[str, list[int]]:
    text, ids = "", []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            obj = json.loads(line[6:])
            for ch in obj.get("choices", []):
                text += ch.get("delta", {}).get("content") or ""
                ids += ch.get("token_ids", [])
    return text, ids


def test_compare_streams_what_the_api_answers(env):
    c, token = login(env, KEY)
    assert c.post("/ui/api/complete", json={"model": "b", "prompt": "Hello"}).status_code == 403
    assert c.post("/ui/api/complete", json={"model": "b", "prompt": "Hello"},
                  headers={"X-CSRF-Token": token, "Origin": "http://evil.example"}).status_code == 403
    anon = browser(env)
    anon_token = csrf_of(anon.get("/ui/login").text)
    assert anon.post("/ui/api/complete", json={"model": "b", "prompt": "Hello"},
                     headers={"X-CSRF-Token": anon_token}).status_code == 401
    for model in ("base", "b", "a@2", "a:0.7+b:0.3"):
        r = c.post("/ui/api/complete", json={"model": model, "prompt": "Hello", "max_tokens": 12},
                   headers={"X-CSRF-Token": token})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text, ids = _sse_text(r.text)
        ref = httpx.post(env["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12,
                               "temperature": 0, "return_token_ids": True}, timeout=60).json()
        assert ids == ref["choices"][0]["token_ids"] and len(ids) == 12
        assert text == ref["choices"][0]["message"]["content"]
    for model, n in (("nope", 8), ("b", 999)):  # unknown adapter; more tokens than the server allows
        r = c.post("/ui/api/complete", json={"model": model, "prompt": "Hello", "max_tokens": n},
                   headers={"X-CSRF-Token": token})
        ref = httpx.post(env["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": n})
        assert r.status_code == ref.status_code >= 400 and r.json() == ref.json()  # the API's error, passed through


def test_compare_refuses_a_max_tokens_that_is_no_whole_number(env):
    c, token = login(env, KEY)
    for raw in ("Infinity", "-Infinity", "NaN", "1e400", "2.5", '"64"', "true", "null"):
        body = '{"model": "b", "prompt": "Hello", "max_tokens": %s}' % raw
        r = c.post("/ui/api/complete", content=body, headers={"X-CSRF-Token": token,
                                                                "Content-Type": "application/json"})
        assert r.status_code == 400 and "'max_tokens' must be a whole number" in r.json()["error"]["message"], raw
    r = c.post("/ui/api/complete", json={"model": "b", "prompt": "Hello", "max_tokens": 3.0},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and len(_sse_text(r.text)[1]) == 3


def test_a_run_with_unreadable_metrics_is_listed_as_unreadable(env):
    bad = env["runs"] / "latin1"
    bad.mkdir()
    (bad / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0, "note": "caf\xe9"}\n')
    try:
        c, _ = login(env, KEY)
        page = c.get("/ui/runs")
        assert page.status_code == 200 and "r1" in page.text
        row = re.search(r"latin1.*?</tr>", page.text, re.S).group(0)
        assert "status-unreadable" in row and "metrics.jsonl is not UTF-8 text (byte 37" in row, row
        r = c.get("/ui/runs/latin1")
        assert r.status_code == 200 and "metrics.jsonl is not UTF-8 text" in r.text
    finally:
        (bad / "metrics.jsonl").unlink()
        bad.rmdir()


def test_compare_kl_is_the_apis_score(env):
    """Compare's per-token KL (/ui/api/score) is /v1/score on the same chat prompt and answer tokens, behind the
    session's login and CSRF token; the API's errors pass through."""
    c, token = login(env, KEY)
    body = {"model": "a:0.7+b:0.3", "prompt": "Hello <script>", "token_ids": [28, 29, 30, 31]}
    assert c.post("/ui/api/score", json=body).status_code == 403
    anon = browser(env)
    assert anon.post("/ui/api/score", json=body,
                     headers={"X-CSRF-Token": csrf_of(anon.get("/ui/login").text)}).status_code == 401
    r = c.post("/ui/api/score", json=body, headers={"X-CSRF-Token": token})
    ref = httpx.post(env["url"] + "/v1/score", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": body["model"], "messages": [{"role": "user", "content": body["prompt"]}],
                           "completion": body["token_ids"]}).json()
    got = r.json()
    assert r.status_code == 200 and got["kl"] == ref["kl"] and len(got["kl"]) == 4 and min(got["kl"]) > 0
    assert got["kl_max"] == max(got["kl"]) and got["completion_token_ids"] == body["token_ids"]
    r = c.post("/ui/api/score", json={**body, "token_ids": []}, headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion"
    r = c.post("/ui/api/score", json={**body, "prompt": 5}, headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "bad compare request" in r.json()["error"]["message"]


def test_names_and_texts_are_escaped_and_headers_set(env):
    c, _ = login(env, KEY)
    r = c.get("/ui/adapters")
    assert "first &lt;script&gt;window.__xss=1&lt;/script&gt;" in r.text and XSS not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    runs = c.get("/ui/runs").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in runs and "<img src=x" not in runs
    assert '/ui/runs/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"' in runs
    assert c.get("/ui/runs/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E").status_code == 200
    sweep = c.get("/ui/sweeps/sw").text
    assert "<h1>Sweep &lt;script&gt;" in sweep and XSS not in sweep
    assert '<img src="/ui/sweeps/sw/plots/p.png" alt="plot">' in sweep


def test_no_path_traversal(env):
    c, _ = login(env, KEY)
    r = c.get("/ui/sweeps/sw/plots/p.png")
    assert r.status_code == 200 and r.content == PNG and r.headers["content-type"] == "image/png"
    for path in ("/ui/sweeps/sw/plots/..%2Fsecret.png", "/ui/sweeps/sw/plots/link.png", "/ui/sweeps/sw/plots/report.md",
                 "/ui/sweeps/..%2F..", "/ui/sweeps/%2E%2E/plots/secret.png", "/ui/runs/..%2Fruns",
                 "/ui/runs/%2E%2E", "/ui/static/..%2F__init__.py", "/ui/static/ui.css.bak"):
        r = c.get(path)
        assert r.status_code == 404 and b"PNG secret" not in r.content, path
    assert c.get("/ui/static/ui.css").headers["content-type"].startswith("text/css")
    for path in ("/ui/adapters/nope", "/ui/runs/nope", "/ui/runs/nope/chart", "/ui/sweeps/nope"):  # one 404 page
        r = c.get(path)
        assert r.status_code == 404 and "nope" in r.text and "<title>" in r.text, path


def test_live_chart_grows_and_logout_ends_the_session(env):
    c, token = login(env, KEY)
    r = c.get("/ui/runs/r1/chart")
    assert r.headers["x-run-status"] == "running" and 'data-series="loss" data-n="3"' in r.text
    with open(env["runs"] / "r1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.5}) + "\n" + json.dumps({"step": 4, "eval_loss": 0.7}) + "\n")
    r = c.get("/ui/runs/r1/chart")
    assert 'data-series="loss" data-n="4"' in r.text and 'data-series="eval_loss" data-n="1"' in r.text
    assert '<strong id="run-loss">0.5</strong>' in r.text
    sid = c.cookies["lorakit_session"]
    assert c.post("/ui/logout", data={"csrf": "wrong"}).status_code == 403
    r = c.post("/ui/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert httpx.get(env["url"] + "/ui/runs", cookies={"lorakit_session": sid}).status_code == 303


def test_lorakit_ui_serves_the_dashboard_without_a_model(env):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "ui", "--registry", str(env["root"] / "reg.sqlite"),
                             "--runs-dir", str(env["runs"]), "--port", str(port), "--api-key", KEY],
                            env={**os.environ, "PYTHONPATH": src}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/ui/login", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.3)
        c, token = login({"url": url}, KEY)
        page = c.get("/ui/adapters").text
        assert 'data-name="a"' in page and 'data-name="b"' in page and "tiny" in page
        assert 'data-name="r1"' in c.get("/ui/runs").text and "no sweeps directory" in c.get("/ui/sweeps").text.lower()
        assert 'id="compare-go" disabled' in c.get("/ui/compare").text
        r = c.post("/ui/api/complete", json={"model": "base", "prompt": "hi"}, headers={"X-CSRF-Token": token})
        assert r.status_code == 503 and "lorakit serve" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 404  # no inference API in this mode
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_mixture_row_names_its_adapters_instead_of_a_rank(env):
    c, _ = login(env, KEY)
    page = c.get("/ui/adapters").text
    row = page.split('data-name="mix:ab"', 1)[1].split("</tr>", 1)[0]
    assert "mixture of 2" in row and "a@2, b@1" in row and "None" not in row
