"""Decode throughput of a mixture of LoRAs against a single adapter (and a two-adapter stack) in the same run,
through the server's engine (continuous batching, per-row slots; the mixture's gates per token, per layer).

Cases, each a batch of --rows requests decoding --tokens tokens together (ignore_eos):
    base      no adapter
    single    every row one adapter (a)
    stack     every row the fixed stack a:0.5+b:0.5 (same slots per row as the mixture, no gates)
    mixture   every row mix:ab (two adapters, per-token gates from each layer's input)
    mixed     half the rows mix:ab, half a single adapter (b)
Rounds alternate the cases, so drifting load on a shared machine hits every case alike. Reported per case: the
median over rounds of decode tokens/s (wall) and of process CPU seconds per decoded token (the figure to trust
on a busy machine). The adapters and the router are random (speed does not depend on what they learned).

    PYTHONPATH=src python bench/mixture_serve.py --out bench/results/mixture_serve_cpu-2core_<date>.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

CASES = ("base", "single", "stack", "mixture", "mixed")


def machine() -> str:
    if os.environ.get("BENCH_MACHINE"):
        return os.environ["BENCH_MACHINE"]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"cpu-{os.cpu_count()}core-{mem:.0f}GiB ({platform.processor() or platform.machine()})"


def build(root: Path, model, r: int, targets: list[str]) -> None:
    """Adapters a, b and a mixture ab over them, written under root."""
    from lorakit import LoraConfig, add_adapter, save_adapter, set_active
    from lorakit.adapters.peft_files import fingerprint
    from lorakit.adapters.mixtures import write_mixture
    from lorakit.core.inject import delete_adapter, set_routing
    from lorakit.core.mixture import Router

    for i, name in enumerate("ab"):
        torch.manual_seed(i)
        add_adapter(model, LoraConfig(r=r, alpha=2 * r, targets=targets, init_lora_weights=False), name)
        save_adapter(model, root / name, name)
    set_active(model, ["a", "b"])
    router = Router(model, ["a", "b"])
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.1)
    write_mixture(root / "ab", router, {"a": root / "a", "b": root / "b"}, fingerprint(model), "embedded")
    set_routing(model, None)
    set_active(model, None)
    for name in "ab":
        delete_adapter(model, name)


def requests(case: str, root: Path, n: int, prompt: list[int], tokens: int, sink):
    from lorakit.adapters.peft_files import content_sha256, read_adapter
    from lorakit.adapters.mixtures import FILES, read_mixture
    from lorakit.serve.request import AdapterUse, GenRequest, MixtureUse

    def use(name, w=1.0):
        return AdapterUse(content_sha256(root / name), lambda: read_adapter(root / name), w, name)

    mix = MixtureUse(content_sha256(root / "ab", FILES), lambda: read_mixture(root / "ab"), "mix:ab")
    kinds = {"base": ([], None), "single": ([use("a")], None), "stack": ([use("a", 0.5), use("b", 0.5)], None),
             "mixture": ([use("a"), use("b")], mix)}
    out = []
    for i in range(n):
        kind = case if case != "mixed" else ("mixture" if i % 2 == 0 else "single_b")
        adapters, m = kinds[kind] if kind != "single_b" else ([use("b")], None)
        out.append(GenRequest(list(prompt), adapters, tokens, ignore_eos=True, mixture=m,
                              sink=lambda ev, i=i: sink(i, ev)))
    return out


def run_case(engine, case: str, root: Path, args, prompt: list[int]) -> dict:
    n = args.rows
    first, done = [None] * n, threading.Event()
    count = [0] * n
    finished = [0]
    lock = threading.Lock()

    def sink(i, ev):
        with lock:
            if ev[0] == "token":
                count[i] += 1
                if first[i] is None:
                    first[i] = time.perf_counter()
            else:
                if ev[0] == "error":
                    raise RuntimeError(ev[1])
                finished[0] += 1
                if finished[0] == n:
                    done.set()

    reqs = requests(case, root, n, prompt, args.tokens, sink)
    gate = threading.Event()
    engine.call(gate.wait)  # hold the engine until every request is queued: they decode together
    for r in reqs:
        engine.submit(r)
    steps0 = engine.stats["decode_steps"]
    gate.set()
    while first.count(None):  # prefill done for every row
        time.sleep(0.001)
    t0, c0 = time.perf_counter(), time.process_time()
    start_tokens = sum(count)
    if not done.wait(600):
        raise RuntimeError(f"case {case} did not finish")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    decoded = sum(count) - start_tokens
    return {"case": case, "rows": n, "decoded_tokens": decoded, "decode_steps": engine.stats["decode_steps"] - steps0,
            "wall_s": wall, "tokens_per_s": decoded / wall, "cpu_ms_per_token": 1000 * cpu / decoded}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.generate import encode_prompt
    from lorakit.models import load_base
    from lorakit.serve.engine import Engine

    model, tok = load_base(args.model, dtype="float32", device="cpu")
    prompt = encode_prompt(tok, [{"role": "user", "content": "Write a short story about a lighthouse."}])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, model, args.r, args.targets.split(","))
        engine = Engine(model, tok, max_slots=4, max_batch=args.rows).start()
        try:
            run_case(engine, "mixture", root, argparse.Namespace(rows=2, tokens=2), prompt)  # load + warm up
            rows = []
            for rnd in range(args.rounds):
                for case in CASES:
                    row = run_case(engine, case, root, args, prompt) | {"round": rnd}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            engine.stop()
    summary = {}
    for case in CASES:
        rs = [r for r in rows if r["case"] == case]
        summary[case] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "cpu_ms_per_token": statistics.median(r["cpu_ms_per_token"] for r in rs)}
    ref = summary["single"]
    for case in CASES:
        summary[case]["cpu_per_token_vs_single"] = summary[case]["cpu_ms_per_token"] / ref["cpu_ms_per_token"]
        summary[case]["tokens_per_s_vs_single"] = summary[case]["tokens_per_s"] / ref["tokens_per_s"]
    out = {"bench": "mixture_serve", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "load_avg_1m_at_end": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version(),
           "threads": args.threads, "model": args.model, "rows": args.rows, "tokens": args.tokens, "r": args.r,
           "targets": args.targets, "prompt_tokens": len(prompt), "summary": summary, "runs": rows}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
