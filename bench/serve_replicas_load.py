"""Two replicas on one PostgreSQL registry under the hostile load, while the registry changes every second.

    PYTHONPATH=src python bench/serve_replicas_load.py [--clients 64] [--adapters 8] [--duration 60]
        [--registry postgresql://...] [--out bench/results/serve_replicas_load_<machine>_<date>.json]

Two real servers (`python -m lorakit serve`, the embedded model, 1 torch thread each) share one PostgreSQL
registry and one content-addressed store directory; without --registry a throwaway PostgreSQL cluster is
started (tests/pg_cluster.py: initdb + pg_ctl, Unix socket). Honest client i talks to replica i % 2, hostile
ones alternate likewise. The clients are
bench/serve_hostile_load.py's: honest ones stream greedy chat requests naming adapter (i + j) % M (every 4th a
two-adapter stack), every --hostile-every-th client is hostile (bodies to refuse, extreme values, abandoned
requests). Every second the changer makes one change through the admin API of one replica, alternating:
add a new version of adapter t % M (new content: its B scaled by 1 + 0.01 t, so its own blob) or roll that
adapter back; and through the other replica it removes every version but the newest 3 (and the current), so
removed versions' blobs are deleted and their slots dropped.

Checked: every honest request's `x-lorakit-served` header names the versions that served it; a request sent
after the DELETE that removed one of them had returned is a violation ("served by a removed version"). Errors:
any non-200 honest answer or error event. Reported: one JSON object (per replica too), with the machine's load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_hostile_load import H, _mem, _pct, hostile, hostile_bodies  # noqa: E402
from serve_load import TOPICS, Server, _torch_version, machine, make_adapters  # noqa: E402

ADMIN = "bench-admin"
HA = {"Authorization": f"Bearer {ADMIN}"}


def start(args, work: Path, url: str) -> list[Server]:
    """The two replicas, one after the other (each registers the adapters dir: the first adds, the second finds
    them current)."""
    extra = ("--store", str(work / "store"), "--admin-key", ADMIN)
    return [Server(args, work, max_batch=args.max_batch, max_slots=2 * args.adapters, registry=url, extra=extra)
            for _ in range(2)]


def variant(src: Path, dest: Path, scale: float) -> Path:
    """A copy of adapter `src` with its lora_B tensors times `scale`: new content, the same shapes."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_config.json", dest / "adapter_config.json")
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: (v * scale if "lora_B" in k else v) for k, v in t.items()}, str(dest / "adapter_model.safetensors"))
    return dest


async def honest(client, url, i, models, args, deadline, out):
    j = 0
    while time.monotonic() < deadline:
        m = models[(i + j) % len(models)]
        if j % 4 == 3:
            m = f"{m}:0.5+{models[(i + j + 1) % len(models)]}:0.5"
        body = {"model": m, "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Give me a fun fact about {TOPICS[(i + j) % 8]}."}]}
        t0, sent = time.perf_counter(), time.time()
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=H) as r:
                if r.status_code != 200:
                    out["errors"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                else:
                    tokens = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                out["errors"].append(ev["error"]["message"])
                            elif ev["choices"] and ev["choices"][0]["delta"].get("content") is not None:
                                tokens += 1
                    out["served"].append((sent, r.headers.get("x-lorakit-served", ""), url))
                    out["latency"].append(time.perf_counter() - t0)
                    out["tokens"] += tokens
        except httpx.HTTPError as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
        j += 1


async def changer(client, urls, names, srcs, work, deadline, out):
    """One change a second: add (new content) or roll back adapter t % M through replica t % 2; then remove all
    but the newest 3 versions (and the current) through the other replica."""
    t = 0
    while time.monotonic() < deadline:
        tick = time.monotonic()
        k, a, b = t % len(names), urls[t % 2], urls[(t + 1) % 2]
        name = names[k]
        try:
            if (t // len(names)) % 2 == 0:
                path = await asyncio.to_thread(variant, srcs[k], work / "variants" / f"{name}-{t}", 1 + 0.01 * (t + 1))
                r = await client.post(a + "/admin/adapters", headers=HA, json={"name": name, "path": str(path)})
                out["adds"] += r.status_code == 201
            else:
                r = await client.post(a + f"/admin/adapters/{name}/rollback", headers=HA, json={})
                out["rollbacks"] += r.status_code == 200
            if r.status_code not in (200, 201):
                out["change_errors"].append(f"{r.status_code}: {r.text[:200]}")
            d = (await client.get(b + f"/admin/adapters/{name}", headers=HA)).json()
            vs = sorted(v["version"] for v in d["versions"])
            for v in vs[:-3]:
                if v != d["current_version"]:
                    r = await client.delete(b + f"/admin/adapters/{name}@{v}", headers=HA)
                    if r.status_code == 200:
                        out["removed"][f"{name}@{v}"] = time.time()  # the removal has committed by now
                    else:
                        out["change_errors"].append(f"{r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as e:
            out["change_errors"].append(f"{type(e).__name__}: {e}")
        t += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))


async def run(urls, names, srcs, work, args) -> dict:
    out = {"latency": [], "tokens": 0, "errors": [], "hostile": {}, "served": [], "removed": {}, "adds": 0,
           "rollbacks": 0, "change_errors": []}
    bodies = hostile_bodies(names)
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.duration
        await asyncio.gather(changer(client, urls, names, srcs, work, deadline, out), *(
            hostile(client, urls[(i // args.hostile_every) % 2], i, bodies, deadline, out)
            if args.hostile_every and i % args.hostile_every == 0
            else honest(client, urls[i % 2], i, names, args, deadline, out) for i in range(args.clients)))
        out["wall_s"] = time.perf_counter() - t0
    return out


def violations(res: dict) -> tuple[list[str], int]:
    """(requests sent after a removal of a version that served them had returned, requests sent before and
    served by a version removed later: the check's reach)."""
    bad, later = [], 0
    for sent, served, url in res["served"]:
        for part in served.split(","):
            ref = part.split("#")[0]
            if ref in res["removed"] and sent > res["removed"][ref]:
                bad.append(f"{url}: {ref} served a request sent {sent - res['removed'][ref]:.3f} s after its removal")
            elif ref in res["removed"]:
                later += 1
    return bad, later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("--model", "embedded"), ("--device", "cpu"), ("--targets", "q_proj,k_proj,v_proj,o_proj"),
                          ("--registry", ""), ("--note", ""), ("--out", "")):
        ap.add_argument(flag, default=default)
    for flag, default in (("--clients", 64), ("--adapters", 8), ("--hostile-every", 8), ("--max-tokens", 16),
                          ("--max-batch", 16), ("--rank", 16), ("--threads", 1)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--duration", type=float, default=60.0)
    args = ap.parse_args()
    cluster = None
    if not args.registry:
        from pg_cluster import Cluster

        cluster = Cluster()
        args.registry = cluster.new_database()
    try:
        with tempfile.TemporaryDirectory(prefix="serve_replicas-") as tmp:
            work = Path(tmp)
            make_adapters(args.model, work / "adapters", args.adapters, args.rank, args.targets.split(","))
            names = [f"ad{i:02d}" for i in range(args.adapters)]
            servers = start(args, work, args.registry)
            try:
                urls = [s.url for s in servers]
                for m in names:
                    for u in urls:
                        httpx.post(u + "/v1/chat/completions", headers=H, timeout=600, json={
                            "model": m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
                before = [s.stats() for s in servers]
                load0 = os.getloadavg()[0]
                res = asyncio.run(run(urls, names, [work / "adapters" / n for n in names], work, args))
                time.sleep(2.0)  # abandoned rows retired, last slot drops done
                health = [httpx.get(u + "/health", timeout=10).json() for u in urls]
                mem = [_mem(s.proc.pid) for s in servers]
            finally:
                for s in servers:
                    s.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    bad, later = violations(res)
    per = []
    for u, b, h, m in zip(urls, before, health, mem):
        mine = [x for x in res["served"] if x[2] == u]
        per.append({"honest_requests": len(mine), "registry_events": h["registry"]["events"],
                    "slots_dropped": h["registry"]["slots_dropped"],
                    "engine_errored_rows": h["engine"]["errors"] - b["errors"],
                    "engine_cancelled": h["engine"]["cancelled"] - b["cancelled"], "peak_rss_mib": m["peak_rss_mib"]})
    row = {"bench": "serve_replicas_load", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "model": args.model, "replicas": 2, "registry": "postgresql (throwaway cluster)" if cluster else "given",
           "clients": args.clients, "adapters": args.adapters, "rank": args.rank, "max_tokens": args.max_tokens,
           "duration_s": args.duration, "wall_s": round(res["wall_s"], 2),
           "honest_requests": len(res["served"]), "honest_errors": len(res["errors"]),
           "error_samples": res["errors"][:5], "served_by_removed_version": len(bad), "violation_samples": bad[:5],
           "served_by_a_version_removed_later": later,
           "adds": res["adds"], "rollbacks": res["rollbacks"], "versions_removed": len(res["removed"]),
           "change_errors": len(res["change_errors"]), "change_error_samples": res["change_errors"][:5],
           "tokens_per_s": round(res["tokens"] / res["wall_s"], 2),
           "latency_p50_s": _pct(res["latency"], 0.5), "latency_p99_s": _pct(res["latency"], 0.99),
           "hostile_requests": sum(res["hostile"].values()), "hostile_by_status": res["hostile"],
           "hostile_5xx": sum(n for k, n in res["hostile"].items() if k.startswith("5")), "per_replica": per,
           "loadavg_1m_before": round(load0, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
           "cpu_count": os.cpu_count(), "torch": _torch_version(), "note": args.note}
    print(json.dumps(row, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
