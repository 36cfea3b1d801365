"""Serving under load with hostile clients among the honest ones: errors, latency, time to first token, memory.

    PYTHONPATH=src python bench/serve_hostile_load.py [--clients 64] [--adapters 8] [--duration 60]
        [--hostile-every 8] [--max-tokens 16] [--out bench/results/serve_hostile_load_<machine>_<date>.json]

The server is the real one (`python -m lorakit serve` in a subprocess, the embedded model, its automatic
torch thread count unless --threads). --clients asyncio clients run for --duration seconds, each sending
requests back to back; every --hostile-every-th client is hostile. Honest clients stream chat requests
(greedy, `ignore_eos`, --max-tokens tokens) naming adapter (i + j) % M, every 4th request a two-adapter
stack; hostile ones send bodies the server must refuse (deep nesting, NaN/inf/3e38 stack weights, 5000-digit
numbers, strings for booleans, bad UTF-8, unknown adapters), valid but extreme ones (temperature 1e-45,
weights +-10), and non-streaming requests they abandon after 0.3 s (the server must cancel them).
Reported (one JSON object): honest requests, errors, tokens/s, p50/p99 latency and time to first token;
hostile requests by status (any 5xx is an error); the engine's cancelled/errored rows; the server's RSS
(VmRSS) before and after and its peak (VmHWM); its torch threads; the 1-minute load average.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import KEY, TOPICS, Server, _torch_version, make_adapters, machine  # noqa: E402

H = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


def hostile_bodies(adapters: list[str]) -> list[tuple[bytes, float | None]]:
    """(raw body, client timeout or None) for /v1/chat/completions."""
    a, b = adapters[0], adapters[1]
    ok = '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4' % a
    bodies = [b"[" * 5000 + b"]" * 5000, b'{"model":' * 3000 + b"1" + b"}" * 3000,
              (ok + ', "seed": ' + "9" * 5000 + "}").encode(), (ok + ', "temperature": NaN}').encode(),
              (ok + ', "top_p": Infinity}').encode(), (ok + ', "stream": "false"}').encode(), b"\xff\xfe{",
              ok.replace(a, f"{a}:3e38").encode() + b"}", ok.replace(a, f"{a}:NaN+{b}:1").encode() + b"}",
              ok.replace(a, f"{a}:1e39").encode() + b"}", ok.replace(a, "nope@7").encode() + b"}",
              ok.replace(a, "../etc/passwd").encode() + b"}", (ok + ', "max_tokens": 1e308}').encode(),
              ok.replace("Hi", "\\ud800\\u0000").encode() + b"}", b"null", b""]
    valid = [(ok + ', "temperature": 1e-45}').encode(), ok.replace(a, f"{a}:10+{b}:-10").encode() + b"}"]
    abandon = ('{"model": "%s", "messages": [{"role": "user", "content": "Tell a long story."}], '
               '"max_tokens": 200, "ignore_eos": true}' % b).encode()
    return [(x, None) for x in bodies + valid] + [(abandon, 0.3)]


async def honest(client: httpx.AsyncClient, url: str, i: int, models: list[str], args, deadline: float, out: dict):
    j = 0
    while time.monotonic() < deadline:
        m = models[(i + j) % len(models)]
        if j % 4 == 3:
            m = f"{m}:0.5+{models[(i + j + 1) % len(models)]}:0.5"
        body = {"model": m, "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Give me a fun fact about {TOPICS[(i + j) % 8]}."}]}
        t0, ttft, tokens = time.perf_counter(), None, 0
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=H) as r:
                if r.status_code != 200:
                    out["errors"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            out["errors"].append(ev["error"]["message"])
                        elif ev.get("usage"):
                            tokens = ev["usage"]["completion_tokens"]
                        elif ttft is None and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                            ttft = time.perf_counter() - t0
                    out["latency"].append(time.perf_counter() - t0)
                    out["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
                    out["tokens"] += tokens
        except httpx.HTTPError as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
        j += 1


async def hostile(client: httpx.AsyncClient, url: str, i: int, bodies, deadline: float, out: dict):
    rng = random.Random(i)
    while time.monotonic() < deadline:
        raw, timeout = rng.choice(bodies)
        try:
            r = await client.post(url + "/v1/chat/completions", content=raw, headers=H,
                                  timeout=timeout or 600)
            key = str(r.status_code)
        except httpx.ReadTimeout:
            key = "abandoned"
        out["hostile"][key] = out["hostile"].get(key, 0) + 1
        await asyncio.sleep(0.05)


async def run(url: str, models: list[str], args) -> dict:
    out = {"latency": [], "ttft": [], "tokens": 0, "errors": [], "hostile": {}}
    bodies = hostile_bodies(models)
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.duration
        await asyncio.gather(*(
            hostile(client, url, i, bodies, deadline, out) if args.hostile_every and i % args.hostile_every == 0
            else honest(client, url, i, models, args, deadline, out) for i in range(args.clients)))
        out["wall_s"] = time.perf_counter() - t0
    return out


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def _mem(pid: int) -> dict:
    f = {ln.split(":")[0]: ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
         if ln.startswith(("VmRSS", "VmHWM", "Threads"))}
    return {"rss_mib": round(int(f["VmRSS"]) / 1024, 1), "peak_rss_mib": round(int(f["VmHWM"]) / 1024, 1),
            "os_threads": int(f["Threads"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--hostile-every", type=int, default=8, help="every N-th client is hostile (0: none)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: the server's own choice)")
    ap.add_argument("--note", default="", help="recorded as is (e.g. what else ran on the machine)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_hostile-") as tmp:
        work = Path(tmp)
        make_adapters(args.model, work / "adapters", args.adapters, args.rank, args.targets.split(","))
        names = [f"ad{i:02d}" for i in range(args.adapters)]
        server = Server(args, work, max_batch=args.max_batch, max_slots=args.adapters)
        try:
            for m in names:  # resident before the clock starts
                httpx.post(server.url + "/v1/chat/completions", headers=H, timeout=600,
                           json={"model": m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            mem0, before, cpu0 = _mem(server.proc.pid), server.stats(), server.cpu_s()
            load0 = os.getloadavg()[0]
            res = asyncio.run(run(server.url, names, args))
            time.sleep(1.0)  # let abandoned rows be retired
            mem1, after, cpu = _mem(server.proc.pid), server.stats(), server.cpu_s() - cpu0
            log = Path(server.log.name).read_text()
        finally:
            server.stop()
    threads = next((ln.split(":")[1].strip() for ln in log.splitlines() if ln.startswith("torch CPU threads")), None)
    hostile_5xx = sum(n for k, n in res["hostile"].items() if k.startswith("5"))
    row = {"bench": "serve_hostile_load", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "model": args.model, "device": args.device, "clients": args.clients,
           "hostile_clients": len([i for i in range(args.clients) if args.hostile_every and i % args.hostile_every == 0]),
           "adapters": args.adapters, "rank": args.rank, "targets": args.targets, "max_tokens": args.max_tokens,
           "max_batch": args.max_batch, "duration_s": args.duration, "wall_s": round(res["wall_s"], 2),
           "honest_requests": len(res["latency"]), "honest_errors": len(res["errors"]),
           "error_samples": res["errors"][:5], "completion_tokens": res["tokens"],
           "tokens_per_s": round(res["tokens"] / res["wall_s"], 2),
           "latency_p50_s": _pct(res["latency"], 0.5), "latency_p99_s": _pct(res["latency"], 0.99),
           "ttft_p50_s": _pct(res["ttft"], 0.5), "ttft_p99_s": _pct(res["ttft"], 0.99),
           "hostile_requests": sum(res["hostile"].values()), "hostile_by_status": res["hostile"],
           "hostile_5xx": hostile_5xx,
           "engine_cancelled": after["cancelled"] - before["cancelled"],
           "engine_errored_rows": after["errors"] - before["errors"],
           "mean_batch_rows": round((after["decode_rows"] - before["decode_rows"]) /
                                    max(after["decode_steps"] - before["decode_steps"], 1), 2),
           "rss_before_mib": mem0["rss_mib"], "rss_after_mib": mem1["rss_mib"], "peak_rss_mib": mem1["peak_rss_mib"],
           "server_os_threads": mem1["os_threads"], "server_torch_threads": threads,
           "server_cpu_s": round(cpu, 1), "loadavg_1m_before": round(load0, 2),
           "loadavg_1m_after": round(os.getloadavg()[0], 2),
           "cpu_count": os.cpu_count(), "torch": _torch_version(), "note": args.note}
    print(json.dumps(row, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
