"""Two real servers (`lorakit serve` subprocesses) on one PostgreSQL registry and one content-addressed store,
driven over HTTP: a version added through one is served by the other within 1 s; requests for `name@N` stay
on N through adds and rollbacks made on either; a removed version is refused at once by both, its slots are
dropped from the other's memory, and a name removed and added again serves only its new files."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lorakit import LoraConfig
from lorakit.adapters.refs import content_sha256
from lorakit.models import load_base

from serve_helpers import save_noisy_adapter, tiny_base

SRC = str(Path(__file__).resolve().parents[2] / "src")
KEY, ADMIN = "k", "adm"
H, HA = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pg_cluster):
    root = tmp_path_factory.mktemp("replicas")
    base = tiny_base(root)
    model, _ = load_base(str(base), device="cpu")
    qv = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init_lora_weights=False)
    for i in range(6):
        save_noisy_adapter(model, root / f"a{i}", qv, 10 + i)
    url = pg_cluster.new_database()
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "LORAKIT_REGISTRY": url,
           "LORAKIT_STORE": str(root / "store"), "OMP_NUM_THREADS": "1"}
    servers = []
    for name in ("A", "B"):  # started together: both create the schema and record the base, one at a time
        port = _port()
        log = open(root / f"server-{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--port", str(port),
                              "--threads", "1", "--api-key", KEY, "--admin-key", ADMIN, "--max-slots", "4"],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
        servers.append((p, f"http://127.0.0.1:{port}", log))
    try:
        for p, u, log in servers:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(u + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert p.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
                time.sleep(0.2)
        yield {"A": servers[0][1], "B": servers[1][1], "root": root}
    finally:
        for p, _, log in servers:
            p.terminate()
            p.wait(30)
            log.close()


def chat(url: str, model: str) -> tuple[int, str | None, list[int] | None]:
    """(status, x-lorakit-served, greedy token ids) of a short chat request."""
    r = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    ids = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None
    return r.status_code, r.headers.get("x-lorakit-served"), ids


def add(url: str, name: str, path: Path) -> dict:
    r = httpx.post(url + "/admin/adapters", headers=HA, json={"name": name, "path": str(path)}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def until(fn, limit_s: float = 1.0):
    """Call fn() until it returns something true, for at most limit_s; -> (value, seconds taken)."""
    t0 = time.monotonic()
    while True:
        got = fn()
        if got or time.monotonic() - t0 > limit_s:
            return got, time.monotonic() - t0


def sha16(path: Path) -> str:
    return content_sha256(path)[:16]


def test_a_version_added_through_one_is_served_by_the_other_within_1s(pair):
    A, B, root = pair["A"], pair["B"], pair["root"]
    events = httpx.get(B + "/health").json()["registry"]["events"]
    assert add(A, "x", root / "a0")["version"] == 1
    got, took = until(lambda: chat(B, "x")[0] == 200)
    assert got and took < 1.0, took
    assert chat(B, "x")[1] == f"x@1#{sha16(root / 'a0')}"
    noticed, took = until(lambda: httpx.get(B + "/health").json()["registry"]["events"] > events)
    assert noticed and took < 1.0  # B was told (LISTEN/NOTIFY), not only asked


def test_pinned_requests_stay_pinned(pair):
    A, B, root = pair["A"], pair["B"], pair["root"]
    add(A, "p", root / "a1")
    add(B, "p", root / "a2")
    s1, s2 = sha16(root / "a1"), sha16(root / "a2")
    one = {u: chat(u, "p@1") for u in (A, B)}
    assert {u: r[1] for u, r in one.items()} == {A: f"p@1#{s1}", B: f"p@1#{s1}"}
    assert one[A][2] == one[B][2]  # the same files, the same greedy tokens on both replicas
    cur = chat(A, "p")
    assert cur[1] == f"p@2#{s2}" and cur[2] != one[A][2]
    r = httpx.post(B + "/admin/adapters/p/rollback", headers=HA, json={}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == 1
    rolled, took = until(lambda: chat(A, "p")[1] == f"p@1#{s1}")
    assert rolled and took < 1.0
    assert chat(A, "p@2")[1:] == (f"p@2#{s2}", cur[2])  # the pin holds through the rollback


def test_removed_name_readded_serves_only_the_new_files(pair):
    A, B, root = pair["A"], pair["B"], pair["root"]
    add(A, "r", root / "a3")
    old = chat(A, "r")
    assert old[1] == f"r@1#{sha16(root / 'a3')}" and chat(B, "r")[2] == old[2]
    assert "r@1" in httpx.get(A + "/health").json()["engine"]["resident"]
    r = httpx.delete(B + "/admin/adapters/r", headers=HA, timeout=30)
    assert r.status_code == 200 and r.json()["removed"] == ["r@1"]
    assert chat(A, "r")[0] == 404 and chat(A, "r@1")[0] == 404  # never served to a request after the removal
    dropped, took = until(lambda: "r@1" not in httpx.get(A + "/health").json()["engine"]["resident"])
    assert dropped and took < 1.0  # A dropped the removed version's slot on its own
    assert add(B, "r", root / "a4")["version"] == 2  # numbers never repeat
    new = {u: chat(u, "r") for u in (A, B)}
    assert {u: x[1] for u, x in new.items()} == {A: f"r@2#{sha16(root / 'a4')}", B: f"r@2#{sha16(root / 'a4')}"}
    assert new[A][2] == new[B][2] != old[2]
    assert chat(A, "r@1")[0] == 404
