"""Serving load: N concurrent clients over M adapters against base-only traffic, in the same run.

    PYTHONPATH=src python bench/serve_load.py [--clients 8] [--adapters 4,16] [--requests 4]
        [--max-tokens 32] [--out bench/results/serve_load_cpu.jsonl]

The server is the real one (`python -m lorakit serve` in a subprocess, the embedded model by
default); clients are the `openai` async client, each sending its requests one after another
(chat, short prompts, greedy, `ignore_eos` so every request yields exactly --max-tokens tokens).
Cases, all in this one run:
  base             every request names the base model
  mixed-M          request j of client i names adapter (i + j) % M; all M resident (warmed up first)
  churn-M-S        M adapters through S < M memory slots: the LRU reloads adapters from disk
  one-at-a-time-M  the peer: the same server with --max-batch 1 (no batching), mixed-M traffic
One JSON line per case on stdout (and appended to --out); `vs_base` = tokens/s over the base case's
(of the same round; churn and peer compare with the last round's base), `vs_base_cpu` the same
for CPU time per token (base's over the case's: > 1 is cheaper). `server_cpu_ms_per_token`
(the server process's CPU time per generated token) is the figure to trust on a shared machine,
where wall-clock rates move with other programs' load (`loadavg_1m` is recorded per case).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the moon", "bees", "volcanoes", "chess", "tea", "rivers", "owls", "glass"]
KEY = "bench-key"


def machine() -> str:
    if os.environ.get("BENCH_MACHINE"):
        return os.environ["BENCH_MACHINE"]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"cpu-{os.cpu_count()}core-{mem:.0f}GiB"


def make_adapters(model_name: str, root: Path, n: int, r: int, targets: list[str]) -> None:
    import torch

    from lorakit import LoraConfig, add_adapter, delete_adapter, save_adapter
    from lorakit.models import load_base

    model, _ = load_base(model_name, device="cpu")
    for i in range(n):
        torch.manual_seed(i)
        add_adapter(model, LoraConfig(r=r, alpha=2 * r, targets=targets), "x")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        save_adapter(model, root / f"ad{i:02d}", "x")
        delete_adapter(model, "x")


class Server:
    def __init__(self, args, work: Path, max_batch: int, max_slots: int, registry: str = "", extra: tuple = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--registry",
               registry or str(work / "reg.sqlite"), *extra, "--adapters", str(work / "adapters"), "--api-key", KEY,
               "--port", str(self.port), "--max-batch", str(max_batch), "--max-slots", str(max_slots),
               "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        self.log = open(work / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.log.name}")
            time.sleep(0.5)

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used: unlike wall time,
        barely moved by other programs competing for the cores."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()["engine"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


async def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=1800,
                         http_client=None)
    lat: list[float] = []
    tokens = 0

    async def one_client(i: int):
        nonlocal tokens
        for j in range(requests):
            model = models[(i + j) % len(models)]
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Give me a fun fact about {TOPICS[(i + j) % len(TOPICS)]}."}],
                extra_body={"ignore_eos": True})
            lat.append(time.perf_counter() - t0)
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    lat.sort()
    return {"wall_s": round(wall, 3), "requests": len(lat), "completion_tokens": tokens,
            "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}


def run_case(server: Server, case: str, models: list[str], args, warm: list[str], base: dict | None,
             rnd: int = 0) -> dict:
    for m in warm:  # resident before timing (not for the churn case)
        asyncio.run(load(server.url, [m], 1, 1, 2))
    before, cpu0 = server.stats(), server.cpu_s()
    res = asyncio.run(load(server.url, models, args.clients, args.requests, args.max_tokens))
    after, cpu = server.stats(), server.cpu_s() - cpu0
    steps = after["decode_steps"] - before["decode_steps"]
    row = {"bench": "serve_load", "case": case, "round": rnd, "machine": machine(), "device": args.device, "model": args.model,
           "clients": args.clients, "adapters": len([m for m in models if m != "base"]), "rank": args.rank,
           "targets": args.targets, "max_tokens": args.max_tokens, "max_batch": after["max_batch"],
           "max_slots": after["max_slots"], **res,
           "mean_batch_rows": round((after["decode_rows"] - before["decode_rows"]) / max(steps, 1), 2),
           "adapter_loads": after["adapter_loads"] - before["adapter_loads"],
           "server_cpu_s": round(cpu, 2), "server_cpu_ms_per_token": round(1000 * cpu / res["completion_tokens"], 2),
           "vs_base": round(res["tokens_per_s"] / base["tokens_per_s"], 3) if base else 1.0,
           "vs_base_cpu": round(base["server_cpu_ms_per_token"] / (1000 * cpu / res["completion_tokens"]), 3)
           if base else 1.0,
           "server_threads": args.threads or "default", "loadavg_1m": round(os.getloadavg()[0], 2), "torch": _torch_version(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--adapters", default="4,16", help="comma-separated M values")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per case")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--rounds", type=int, default=1, help="repeat base + mixed cases (alternating)")
    ap.add_argument("--churn-slots", type=int, default=4, help="slots for the churn case (0: skip)")
    ap.add_argument("--no-peer", action="store_true", help="skip the one-at-a-time peer")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: the server's own choice)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    ms = [int(m) for m in args.adapters.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        work = Path(tmp)
        make_adapters(args.model, work / "adapters", max(ms), args.rank, args.targets.split(","))
        names = [f"ad{i:02d}" for i in range(max(ms))]
        server = Server(args, work, max_batch=args.clients, max_slots=max(ms))
        try:
            for rnd in range(args.rounds):  # alternate, so drifting machine load hits every case alike
                base = run_case(server, "base", ["base"], args, ["base"], None, rnd)
                for m in ms:
                    run_case(server, f"mixed-{m}", names[:m], args, names[:m], base, rnd)
        finally:
            server.stop()
        if args.churn_slots and max(ms) > args.churn_slots:
            server = Server(args, work, max_batch=args.clients, max_slots=args.churn_slots)
            try:
                run_case(server, f"churn-{max(ms)}-{args.churn_slots}", names, args, [], base)
            finally:
                server.stop()
        if not args.no_peer:
            server = Server(args, work, max_batch=1, max_slots=max(ms))
            try:
                m = ms[0]
                run_case(server, f"one-at-a-time-{m}", names[:m], args, names[:m], base)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
