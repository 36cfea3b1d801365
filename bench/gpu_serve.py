"""Serving throughput on a GPU: the static-cache decoder (CUDA graphs) with 0, 1, 8, 32 mixed adapters against the
bandwidth limit and against transformers' generate (static cache + torch.compile, one adapter merged).

    PYTHONPATH=src python bench/gpu_serve.py --out bench/results/gpu_serve_h200_DATE.jsonl
    PYTHONPATH=src python bench/gpu_serve.py --dry-run --out /tmp/s.jsonl     (CPU, tiny model, no graphs)

A random-weight model of the llama-1b shape (bf16), random r=16 adapters in the PEFT layout on all seven
projections. Each case: `rows` requests of `prompt` random tokens, `new` tokens each, greedy, rows dealt
round-robin over the case's adapters. Reported per case: prefill time, decode tokens/s, ms per step, the
bandwidth limit (bytes a step must read: weights + the KV cache at the rows' mean length, + the adapters' bytes
for adapter cases; over the device copy rate measured here) and the share of it reached, ITL p50/p99 (the time
between a row's tokens, host side), TTFT p50/p99 (submission of all rows to each row's first token).
api=engine runs through StaticEngine.submit (threads, streaming sinks), api=decoder calls the decoder in a loop.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

SHAPES = {"llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                           rope_theta=500000.0),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(shape: str, dtype, dev, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(max_len, 2048), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_adapter(model, seed: int, r: int = 16):
    """An AdapterFile in the PEFT layout (A random, B random and small) on every projection of every layer."""
    from lorakit.adapters.peft_files import PREFIX, AdapterFile
    from lorakit.config import LoraConfig

    g = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for path, mod in model.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) / mod.in_features ** 0.5
            tensors[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.02
    cfg = LoraConfig(r=r, alpha=2 * r, targets=list(TARGETS))
    return AdapterFile(Path(f"bench-adapter-{seed}"), cfg, {}, tensors, {})


def copy_rate(dev) -> float:
    """Device memory bytes/s moved by a large copy (read + write counted)."""
    if dev != "cuda":
        return float("nan")
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


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def weight_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def run_engine_case(model, adapters, n_adapters, args, dev, sync):
    """rows requests through StaticEngine.submit; -> per-row token times."""
    from lorakit.serve.fast import StaticEngine
    from lorakit.serve.request import AdapterUse, GenRequest

    eng = StaticEngine(model, types.SimpleNamespace(eos_token_id=2), max_slots=max(1, len(adapters)), max_batch=args.rows,
                       max_len=args.prompt + args.new + 8, prefill_chunk=args.chunk).start()
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.rows)]
    uses = [AdapterUse(f"a{i}", (lambda a=a: a)) for i, a in enumerate(adapters[:n_adapters])]

    def one_pass(rows):
        times = [[] for _ in range(rows)]
        done = [None] * rows
        import threading
        ev = threading.Event()
        left = [rows]

        def sink_for(i):
            def sink(e):
                if e[0] == "token":
                    times[i].append(time.perf_counter())
                else:
                    done[i] = e
                    left[0] -= 1
                    if left[0] == 0:
                        ev.set()
            return sink
        t0 = time.perf_counter()
        for i in range(rows):
            eng.submit(GenRequest(prompts[i], [uses[i % len(uses)]] if uses else [], max_tokens=args.new,
                                  ignore_eos=True, sink=sink_for(i)))
        ev.wait(600)
        return t0, times, done

    one_pass(min(args.rows, 4))  # warm-up: kernels compiled, graphs captured for small buckets
    one_pass(args.rows)  # and for the full bucket
    t0, times, done = one_pass(args.rows)
    info = eng.info()
    eng.stop()
    bad = [d for d in done if d is None or d[0] != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not finish: {bad[:3]}")
    return t0, times, info


def summarize(t0, times, args):
    first = [t[0] - t0 for t in times]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    # decode span: from the moment every row has its first token to the end
    start = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    decode_tokens = sum(sum(1 for x in t if x > start) for t in times)
    return dict(ttft_p50_ms=round(1e3 * pct(first, .5), 2), ttft_p99_ms=round(1e3 * pct(first, .99), 2),
                itl_p50_ms=round(1e3 * pct(itl, .5), 3), itl_p99_ms=round(1e3 * pct(itl, .99), 3),
                decode_tok_s=round(decode_tokens / (end - start), 1) if end > start else None,
                total_s=round(end - t0, 3), prefill_s=round(start - t0, 3))


def peer_generate(model, adapter, args, dev, sync):
    """transformers generate, static cache, torch.compile (reduce-overhead), one adapter merged into the weights."""
    from lorakit.serve.slots import adapter_scales

    with torch.no_grad():
        for path, (A, B, scale, _) in adapter_scales(adapter).items():
            w = model.get_submodule(path).weight
            w += (scale * (B.float() @ A.float())).to(device=w.device, dtype=w.dtype)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.prompt), generator=g).to(dev)
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
    return dict(total_s=round(dt, 3), tok_s=round(args.rows * (out.shape[1] - ids.shape[1]) / dt, 1))


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill tokens per engine turn")
    ap.add_argument("--cases", default="0,1,8,32", help="adapter counts")
    ap.add_argument("--peer", action="store_true", help="also transformers' compiled static-cache generate")
    ap.add_argument("--profile", default="", help="adapter counts to profile a decode step at (CUDA), e.g. 0,32")
    args = ap.parse_args(argv)
    cuda = not args.dry_run
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = "tiny" if args.dry_run else "llama-1b"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(shape, dtype, dev, args.prompt + args.new + 8)
    rate = copy_rate(dev)
    wbytes = weight_bytes(model)
    cfg = model.config
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * torch.empty(0, dtype=dtype).element_size()
    meta = dict(tool="lorakit", bench="gpu_serve", shape=shape, dtype=str(dtype)[6:], rows=args.rows,
                prompt=args.prompt, new=args.new, r=16, torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu", date=datetime.date.today().isoformat(),
                copy_gbs=round(rate / 1e9, 1), weight_bytes=wbytes)
    counts = [int(c) for c in args.cases.split(",") if c]
    profiled = [int(c) for c in args.profile.split(",") if c]
    adapters = [make_adapter(model, i) for i in range(max(counts + profiled + [1]))]
    fh = open(args.out, "a") if args.out else None

    def put(row):
        line = json.dumps(dict(meta, **row))
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()

    for n in profiled:
        profile(model, adapters, n, args, dev)
    base_tok_s = None
    for n in counts:
        t0, times, info = run_engine_case(model, adapters, n, args, dev, sync)
        row = dict(case=f"engine-{n}", api="engine", adapters=n, **summarize(t0, times, args),
                   graphs=info.get("graphs"), steps=info.get("decode_steps"))
        mean_len = args.prompt + args.new / 2
        lora = n * sum(a.numel() * a.element_size() for a in adapters[0].tensors.values()) // 2  # fp32 -> bf16
        step_bytes = wbytes + args.rows * mean_len * kv_tok + (lora if cuda else 0)
        limit = args.rows * rate / step_bytes if cuda else None
        row.update(step_bytes=int(step_bytes), limit_tok_s=None if limit is None else round(limit, 1),
                   share_of_limit=None if limit is None or not row["decode_tok_s"] else round(row["decode_tok_s"] / limit, 3))
        if n == 0:
            base_tok_s = row["decode_tok_s"]
        elif base_tok_s:
            row["vs_base"] = round(row["decode_tok_s"] / base_tok_s, 3)
        put(row)
    if args.peer:
        put(dict(case="peer-hf-static-compile-merged", api="transformers", adapters=1,
                 **peer_generate(model, adapters[0], args, dev, sync)))
    if fh:
        fh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
