"""Serving throughput on a GPU: the static-cache engine (serve/fast.py, CUDA graphs) against the bandwidth limit and
its peers, all in one run. One JSON line per case on stdout (and appended to --out).

    PYTHONPATH=src python bench/gpu_serve.py --cases 0,1,8,32 --peer --out bench/results/gpu_serve_h200_DATE.jsonl
    PYTHONPATH=src python bench/gpu_serve.py --cases stack2-32,zipf-1000,http-8,peft-8 --out ...
    PYTHONPATH=src python bench/gpu_serve.py --shape llama-8b --cases 0,32
    PYTHONPATH=src python bench/gpu_serve.py --dry-run --cases ... --out /tmp/s.jsonl   (CPU, tiny model, no graphs)

A random-weight model of the llama-1b (or --shape llama-8b) shape in bf16, random r=16 adapters in the PEFT layout
on all seven projections. The rows: `rows` requests of `prompt` random tokens (the same tokens in every case),
exactly `new` tokens each, greedy. Cases (--cases, comma-separated, run in that order):
  N            api=engine, StaticEngine.submit (streaming sinks), rows dealt round-robin over N adapters (0: the
               base); with the bandwidth limit (bytes a step reads: weights + the KV cache at the rows' mean
               length + the N adapters' bytes, over the copy rate measured here) and the share reached; vs_base
               against case 0 of the run
  stack2-N     every request names two of N adapters with weights 1.0 and 0.5; vs_base against case 0 (run
               here if the run has none)
  zipf-N       N adapters written to a folder (/dev/shm when it has room); requests pick one by Zipf(1.0),
               --zipf-requests of them through --zipf-slots slots; first the same requests over --zipf-ref
               adapters round-robin (case zipf-ref-K), then Zipf (vs_ref); adapter read and slot-load p50/p99
  http-N       the N-adapter rows through the real HTTP server and the `openai` client (bench/gpu_serve_http.py);
               vs_engine against case N of the run
  peft-N       PEFT's PeftModel with the same N adapters, mixed-batch generate(adapter_names=...);
               lorakit_x = engine case N's end-to-end tokens/s over PEFT's
and --peer: transformers' generate with a static cache and torch.compile, one adapter merged (runs last: it
merges into the weights). Per engine case: TTFT p50/p99 (submission of all rows to each row's first token), ITL
p50/p99 (between a row's tokens, host side), decode tokens/s (once every row has its first token), end-to-end
tokens/s (all tokens over submission to the last token: what the peers report).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_serve_lib import (SHAPES, build_model, make_adapter, make_prompts, run_engine_case,  # noqa: E402
                           summarize)


def copy_rate(dev) -> float | None:
    """Device memory bytes/s moved by a large copy (read + write counted); None on the CPU."""
    if dev != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    rate = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    del x, y
    return rate


def weight_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def peer_generate(model, adapter, args, dev, sync):
    """transformers generate, static cache, torch.compile (reduce-overhead), one adapter merged into the weights."""
    from lorakit.core.inject import unload
    from lorakit.serve.staging import adapter_scales

    unload(model)  # plain nn.Linear modules, as transformers built them (the engines wrap them for slot routing)
    with torch.no_grad():
        for path, (A, B, scale, _) in adapter_scales(adapter).items():
            w = model.get_submodule(path).weight
            w += (scale * (B.float() @ A.float())).to(device=w.device, dtype=w.dtype)
    ids = torch.tensor(make_prompts(args.rows, args, model.config.vocab_size), device=dev)
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = None
    if dev == "cuda":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    model.generate(ids, **kw)  # compile
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    sync()
    dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return dict(total_s=round(dt, 3), new_tokens=new, e2e_tok_s=round(args.rows * new / dt, 1))


def profile(model, adapters, n, args, dev):
    """Kernel time of eager decode steps at `rows` rows (torch.profiler), after prefill: where a step goes."""
    from torch.profiler import ProfilerActivity, profile as prof

    from lorakit.adapters.peft_files import fingerprint
    from lorakit.serve.decoder import Decoder
    from lorakit.serve.slots import SlotBank

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bank = SlotBank(model, max(1, n), fingerprint(model))
    slots = [bank.acquire(f"p{i}", lambda a=a: a) for i, a in enumerate(adapters[:n])]
    dec = Decoder(model, bank, args.rows, args.prompt + args.new + 8)
    spec = [([slots[i % n]] if n else [], [1.0] if n else [], None) for i in range(args.rows)]
    g = torch.Generator().manual_seed(7)
    for i in range(0, args.rows, 8):
        m = min(8, args.rows - i)
        bank.set_rows(spec[i:i + m])
        dec.prefill(list(range(i, i + m)), torch.randint(3, 500, (m, args.prompt), generator=g).tolist(), 0)
    routing = bank.batch(spec) if n else None
    rows, toks, pos = list(range(args.rows)), [5] * args.rows, [args.prompt] * args.rows
    for _ in range(3):
        dec.decode(rows, toks, pos, routing, eager=False)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        dec.decode(rows, toks, pos, routing, eager=False)
    sync()
    graph_ms = (time.perf_counter() - t0) / 20 * 1e3
    bank.bind(*(None, None) if routing is None else (routing[0].to(dev), routing[1].to(dev)))
    for _ in range(2):
        dec._decode_body(args.rows)
    sync()
    with prof(activities=[ProfilerActivity.CUDA if dev == "cuda" else ProfilerActivity.CPU]) as p:
        for _ in range(5):
            dec._decode_body(args.rows)
        sync()
    print(f"# profile adapters={n}: graph step {graph_ms:.3f} ms (incl. host copies)", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total", row_limit=25), flush=True)


def parse_cases(spec: str) -> list[tuple[str, int]]:
    """'0,8,stack2-32,zipf-1000,http-8,peft-8' -> [("engine", 0), ("engine", 8), ("stack2", 32), ...]."""
    out = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        kind, _, n = tok.rpartition("-")
        if kind not in ("", "stack2", "zipf", "http", "peft") or not n.isdigit():
            raise SystemExit(f"unknown case {tok!r}: N, stack2-N, zipf-N, http-N or peft-N")
        if kind in ("stack2", "peft") and int(n) < {"stack2": 2, "peft": 1}[kind]:
            raise SystemExit(f"{tok!r}: {kind} needs at least {2 if kind == 'stack2' else 1} adapters")
        out.append((kind or "engine", int(n)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--shape", default="llama-1b", choices=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill tokens per engine turn")
    ap.add_argument("--cases", default="0,1,8,32", help="N, stack2-N, zipf-N, http-N, peft-N (see the top)")
    ap.add_argument("--zipf-slots", type=int, default=64, help="adapter slots on the device for zipf-N")
    ap.add_argument("--zipf-requests", type=int, default=0, help="requests of zipf-N (default 4 x rows)")
    ap.add_argument("--zipf-ref", type=int, default=8, help="adapters of the round-robin case zipf-N is compared with")
    ap.add_argument("--peer", action="store_true", help="also transformers' compiled static-cache generate")
    ap.add_argument("--profile", default="", help="adapter counts to profile a decode step at (CUDA), e.g. 0,32")
    args = ap.parse_args(argv)
    cuda = not args.dry_run
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = "tiny" if args.dry_run else args.shape
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cases = parse_cases(args.cases)
    t_build = time.perf_counter()
    model = build_model(shape, dtype, dev, args.prompt + args.new + 8)
    rate = copy_rate(dev)
    wbytes = weight_bytes(model)
    cfg = model.config
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * torch.empty(0, dtype=dtype).element_size()
    meta = dict(tool="lorakit", bench="gpu_serve", shape=shape, dtype=str(dtype)[6:], rows=args.rows,
                prompt=args.prompt, new=args.new, r=16, torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu", date=datetime.date.today().isoformat(),
                copy_gbs=None if rate is None else round(rate / 1e9, 1), weight_bytes=wbytes)
    if os.environ.get("LORAKIT_DECODE_COMPILE") == "1":  # the decoder's experimental torch.compile knob
        meta["decode_compile"] = True
    meta["grouped"] = os.environ.get("LORAKIT_GROUPED", "1") != "0"  # q/k/v and gate/up adapters: one kernel pair
    profiled = [int(c) for c in args.profile.split(",") if c]
    need = [n for kind, n in cases if kind != "zipf"] + profiled + [1]
    adapters = [make_adapter(model, i) for i in range(max(need))]
    log(f"# model and {len(adapters)} adapters in {time.perf_counter() - t_build:.1f} s")
    fh = open(args.out, "a") if args.out else None

    def put(row):
        line = json.dumps(dict(meta, **row))
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()

    for n in profiled:
        profile(model, adapters, n, args, dev)
    engine = {}  # adapter count -> that case's row, for the cases compared with it
    prompts = make_prompts(args.rows, args, cfg.vocab_size)

    def engine_case(n):
        from gpu_serve_cases import uses_for

        t0, times, info = run_engine_case(model, prompts, uses_for(adapters, n, args.rows), args, n)
        row = dict(case=f"engine-{n}", api="engine", adapters=n, **summarize(t0, times),
                   graphs=info.get("graphs"), steps=info.get("decode_steps"),
                   measured=info.get("pass"), compile_failures=info.get("compile_failures"))
        lora = n * sum(t.numel() * t.element_size() for t in adapters[0].tensors.values())
        step_bytes = wbytes + args.rows * (args.prompt + args.new / 2) * kv_tok + lora
        limit = args.rows * rate / step_bytes if rate else None
        row.update(step_bytes=int(step_bytes), limit_tok_s=None if limit is None else round(limit, 1),
                   share_of_limit=None if limit is None or not row["decode_tok_s"] else round(row["decode_tok_s"] / limit, 3))
        if n and 0 in engine:
            row["vs_base"] = round(row["decode_tok_s"] / engine[0]["decode_tok_s"], 3)
        engine[n] = row
        put(row)

    def run_case(kind, n):
        if kind == "engine":
            engine_case(n)
        elif kind == "stack2":
            from gpu_serve_cases import stack_case

            if 0 not in engine:
                engine_case(0)
            row = dict(case=f"stack2-{n}", **stack_case(model, adapters, n, args))
            row["vs_base"] = round(row["decode_tok_s"] / engine[0]["decode_tok_s"], 3)
            put(row)
        elif kind == "zipf":
            from gpu_serve_cases import zipf_case

            for row in zipf_case(model, n, args, log):
                put(row)
        elif kind == "http":
            from gpu_serve_http import http_case

            t0, times, info = http_case(model, adapters, n, args)
            row = dict(case=f"http-{n}", api="http", client="openai", adapters=n, **summarize(t0, times),
                       graphs=info.get("graphs"), steps=info.get("decode_steps"),
                   measured=info.get("pass"), compile_failures=info.get("compile_failures"))
            if n in engine:
                row["vs_engine"] = round(row["decode_tok_s"] / engine[n]["decode_tok_s"], 3)
            put(row)
        elif kind == "peft":
            from gpu_serve_cases import peft_case

            row = dict(case=f"peft-{n}", **peft_case(model, adapters, n, args, sync))
            if n in engine:
                row["lorakit_x"] = round(engine[n]["e2e_tok_s"] / row["e2e_tok_s"], 2)
            put(row)

    failed = 0
    for kind, n in cases:
        t = time.perf_counter()
        try:
            run_case(kind, n)
        except Exception as e:  # noqa: BLE001 - one case's failure is its row; the others still run
            traceback.print_exc()
            failed += 1
            put(dict(case=f"{kind}-{n}", error=f"{type(e).__name__}: {e}"[:2000]))
        log(f"# {kind}-{n}: {time.perf_counter() - t:.1f} s")
    if args.peer:
        row = dict(case="peer-hf-static-compile-merged", api="transformers", adapters=1,
                   **peer_generate(model, adapters[0], args, dev, sync))
        if 1 in engine:
            row["lorakit_x"] = round(engine[1]["e2e_tok_s"] / row["e2e_tok_s"], 2)
        put(row)
    if fh:
        fh.close()
    return 1 if failed else 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
