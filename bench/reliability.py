"""Availability under attack (issue 26): one request or one file must not stall everyone else.

    PYTHONPATH=src python bench/reliability.py [--out bench/results/reliability_<machine>_<date>.jsonl]

A real `lorakit serve` in a subprocess (a tiny random Llama with the embedded model's tokenizer, 1 torch thread,
short header/body timeouts) is attacked one way at a time while victims run beside it: two greedy chat requests
(the base and an adapter) sent back to back, and a /health probe every 50 ms. Each case prints one JSON line:
what the attack got (statuses, messages), the victims' latency alone and during the attack (median, max, and the
ratio), whether every victim output equalled its solo output token for token, /health's latency alone and its
worst during the attack, and the server's RSS before and after. tests/reliability/test_attacks.py runs the same
cases and asserts what holds in any run: refusals, equal outputs, /health under 1 s, memory given back.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY, ADMIN = "sk-avail", "sk-avail-admin"
H, HA = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
EVIL = "([a-z_.0-9]+)+X"  # catastrophic backtracking: each character of a module path doubles a failed match
HEADER_S, BODY_S, MAX_RANK = 2.0, 3.0, 64
VICTIMS = [("tiny", "Name three colours."), ("a", "Say hello to the team.")]


# ---------------------------------------------------------------- the server and its files
def build(root: Path) -> Path:
    """The tiny base and the adapters the cases use, under root."""
    import torch
    from transformers import AutoTokenizer

    from lorakit import LoraConfig, add_adapter, delete_adapter, save_adapter
    from lorakit.models import embedded_dir, tiny_llama

    tok = AutoTokenizer.from_pretrained(embedded_dir())
    model = tiny_llama(vocab_size=49152, hidden=128, layers=4, init_std=0.2)
    model.config.max_position_embeddings = 1024
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    q0 = "model.layers.0.self_attn.q_proj"
    for name, cfg in {"a": LoraConfig(r=8, alpha=16, targets="all-linear", init_lora_weights=False),
                      "wide": LoraConfig(r=128, alpha=128, targets=[q0], init_lora_weights=False),
                      "big": LoraConfig(r=MAX_RANK, alpha=64, targets="all-linear", init_lora_weights=False),
                      "evil": LoraConfig(r=4, alpha=8, targets=["q_proj"], init_lora_weights=False),
                      "bad": LoraConfig(r=4, alpha=8, targets=["q_proj"], init_lora_weights=False)}.items():
        torch.manual_seed(len(name))
        add_adapter(model, cfg, "x")
        save_adapter(model, root / name, "x")
        delete_adapter(model, "x")
    for name, pattern in (("evil", {EVIL: 16.0}), ("bad", {"(": 16.0})):
        cfg_file = root / name / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "alpha_pattern": pattern}))
    return root / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(root / "tiny"), "--registry",
               str(root / "reg.sqlite"), "--api-key", KEY, "--admin-key", ADMIN, "--port", str(self.port),
               "--threads", "1", "--max-prompt-tokens", "1000", "--max-new-tokens", "64", "--header-timeout",
               str(HEADER_S), "--body-timeout", str(BODY_S), "--max-lora-rank", str(MAX_RANK)]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
        self.log = open(root / "serve.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=root)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorakit serve exited:\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError("lorakit serve did not answer within 240 s")
        r = httpx.post(self.url + "/admin/adapters", json={"name": "a", "path": str(root / "a")}, headers=HA)
        assert r.status_code == 201, r.text

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ---------------------------------------------------------------- victims and the probe
def victim(client: httpx.Client, url: str, model: str, text: str) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", headers=H, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"], time.perf_counter() - t0


def solo(url: str, rounds: int = 5) -> dict:
    """Each victim's output and median latency alone, and /health's median latency alone."""
    out = {}
    with httpx.Client() as c:
        for model, text in VICTIMS:
            runs = [victim(c, url, model, text) for _ in range(rounds)]
            assert all(ids == runs[0][0] for ids, _ in runs)
            out[model] = (runs[0][0], statistics.median(t for _, t in runs))
        hs = []
        for _ in range(rounds * 4):
            t0 = time.perf_counter()
            c.get(url + "/health", timeout=10)
            hs.append(time.perf_counter() - t0)
    out["health_s"] = statistics.median(hs)
    return out


@contextmanager
def watched(url: str, alone: dict):
    """Victims back to back and a /health probe while the body runs; fills the dict it yields."""
    seen = {"victim_s": [], "equal": True, "health_s": [], "victims": 0}
    stop = threading.Event()

    def victims():
        with httpx.Client() as c:
            while not stop.is_set():
                for model, text in VICTIMS:
                    ids, t = victim(c, url, model, text)
                    seen["equal"] &= ids == alone[model][0]
                    seen["victim_s"].append(t / alone[model][1])
                    seen["victims"] += 1

    def probe():
        with httpx.Client() as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get(url + "/health", timeout=30).status_code == 200
                except httpx.HTTPError:
                    ok = False
                seen["health_s"].append(time.perf_counter() - t0 if ok else float("inf"))
                time.sleep(0.05)

    threads = [threading.Thread(target=victims), threading.Thread(target=probe)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(180)


def together(fns) -> list:
    out = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i, f=f: out.__setitem__(i, f())) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


# ---------------------------------------------------------------- the attacks
def stop_strings(srv: Server) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
            "stop": ["x" * 240_000] * 4}
    huge = together([lambda: httpx.post(srv.url + "/v1/chat/completions", json=body, headers=H, timeout=60)] * 4)
    at_cap = httpx.post(srv.url + "/v1/chat/completions", headers=H, timeout=60,
                        json={**body, "stop": ["y" * 255 + "!"] * 4, "ignore_eos": True})
    return {"huge": [(r.status_code, r.json()["error"]["param"]) for r in huge], "at_cap": at_cap.status_code}


def patterns(srv: Server) -> dict:
    out = {}
    for name in ("evil", "bad"):
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/admin/adapters", headers=HA, timeout=120,
                       json={"name": name, "path": str(srv.root / name)})
        out[name] = {"status": r.status_code, "message": r.json()["error"]["message"],
                     "seconds": round(time.perf_counter() - t0, 2)}
    return out


def ranks(srv: Server) -> dict:
    before_slots, before_rss = srv.health()["engine"]["slot_bytes"], srv.rss_mb()
    wide = httpx.post(srv.url + "/admin/adapters", headers=HA, json={"name": "wide", "path": str(srv.root / "wide")})
    big = httpx.post(srv.url + "/admin/adapters", headers=HA, json={"name": "big", "path": str(srv.root / "big")})
    with httpx.Client() as c:
        ids, _ = victim(c, srv.url, "big", "Use every layer.")
    loaded_slots, loaded_rss = srv.health()["engine"]["slot_bytes"], srv.rss_mb()
    gone = httpx.delete(srv.url + "/admin/adapters/big", headers=HA)
    return {"wide": (wide.status_code, wide.json().get("error", {}).get("message")), "big": big.status_code,
            "big_tokens": len(ids), "removed": gone.json(), "slot_bytes": [before_slots, loaded_slots,
                                                                           srv.health()["engine"]["slot_bytes"]],
            "rss_mb": [round(before_rss, 1), round(loaded_rss, 1), round(srv.rss_mb(), 1)]}


def long_scores(srv: Server) -> dict:
    prompt, completion = list(range(1000, 1480)), list(range(2000, 2480))
    body = {"model": "a", "prompt": prompt, "completion": completion}
    t0 = time.perf_counter()
    rs = together([lambda: httpx.post(srv.url + "/v1/score", json=body, headers=H, timeout=300)] * 3)
    return {"statuses": [r.status_code for r in rs], "equal": len({json.dumps(r.json()["kl"]) for r in rs}) == 1,
            "seconds": round(time.perf_counter() - t0, 2)}


def long_prompts(srv: Server) -> dict:
    body = {"model": "a", "prompt": list(range(1000, 1950)), "max_tokens": 4, "temperature": 0}
    t0 = time.perf_counter()
    rs = together([lambda: httpx.post(srv.url + "/v1/completions", json=body, headers=H, timeout=300)] * 3)
    return {"statuses": [r.status_code for r in rs], "seconds": round(time.perf_counter() - t0, 2)}


def slow_clients(srv: Server, n: int = 100) -> dict:
    """n connections trickle a request head a byte at a time; 5 send a head and then a body too slowly."""
    socks, t0 = [], time.monotonic()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.settimeout(0.01)
        socks.append(s)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    closed_at, i = {}, 0
    while len(closed_at) < n and time.monotonic() - t0 < HEADER_S + 10:
        for k, s in enumerate(socks):
            if k in closed_at:
                continue
            try:
                s.sendall(head[i:i + 1])
                if s.recv(1) == b"":
                    closed_at[k] = time.monotonic() - t0
            except socket.timeout:
                pass
            except OSError:
                closed_at[k] = time.monotonic() - t0
        i += 1
        time.sleep(0.1)
    for s in socks:
        s.close()

    def slow_body():
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(BODY_S + 10)
        t = time.monotonic()
        data = b""
        try:
            while b"\r\n" not in data:
                s.sendall(b" ")
                try:
                    s.settimeout(0.5)
                    data += s.recv(200)
                except socket.timeout:
                    pass
                if time.monotonic() - t > BODY_S + 10:
                    break
        except OSError:
            pass
        s.close()
        return data.split(b"\r\n")[0].decode(errors="replace"), round(time.monotonic() - t, 2)

    bodies = together([slow_body] * 5)
    return {"closed": len(closed_at), "of": n, "last_closed_s": round(max(closed_at.values(), default=-1), 2),
            "slow_bodies": bodies}


def login_flood(srv: Server, clients: int = 50, tries: int = 3) -> dict:
    import re

    def one():
        codes = []
        with httpx.Client(base_url=srv.url) as c:
            for _ in range(tries):
                token = re.search(r'name="csrf" value="([^"]+)"', c.get("/ui/login").text).group(1)
                codes.append(c.post("/ui/login", data={"key": "wrong", "csrf": token, "next": "/ui/adapters"},
                                    headers={"origin": srv.url}).status_code)
        return codes
    t0 = time.perf_counter()
    codes = [c for cs in together([one] * clients) for c in cs]
    return {"checked_401": codes.count(401), "throttled_429": codes.count(429), "other": len(codes) - codes.count(401)
            - codes.count(429), "seconds": round(time.perf_counter() - t0, 2)}


CASES = {"stop_strings": stop_strings, "patterns": patterns, "ranks": ranks, "long_scores": long_scores,
         "long_prompts": long_prompts, "slow_clients": slow_clients, "login_flood": login_flood}


def run_case(srv: Server, alone: dict, name: str) -> dict:
    rss0 = srv.rss_mb()
    with watched(srv.url, alone) as seen:
        time.sleep(0.3)  # the victims are under way
        got = CASES[name](srv)
        time.sleep(0.3)
    ratios = seen["victim_s"] or [float("nan")]
    return {"case": name, "attack": got, "victims": seen["victims"], "victims_equal": seen["equal"],
            "victim_latency_ratio_median": round(statistics.median(ratios), 2),
            "victim_latency_ratio_max": round(max(ratios), 2), "health_alone_s": round(alone["health_s"], 4),
            "health_max_s": round(max(seen["health_s"] or [float("inf")]), 4),
            "health_probes": len(seen["health_s"]), "rss_mb_before": round(rss0, 1),
            "rss_mb_after": round(srv.rss_mb(), 1)}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        build(root)
        srv = Server(root)
        try:
            alone = solo(srv.url)
            lines = []
            for name in args.cases.split(","):
                line = {**run_case(srv, alone, name), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                        "date": time.strftime("%Y-%m-%d")}
                print(json.dumps(line), flush=True)
                lines.append(line)
        finally:
            srv.stop()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
