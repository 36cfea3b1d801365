"""Mixed-adapter LoRA kernels on the GPU: the plain-torch reference against the Triton lora_delta.

    PYTHONPATH=src python bench/gpu_serve_kernels.py --out bench/results/gpu_serve_kernels_h200_DATE.jsonl
    PYTHONPATH=src python bench/gpu_serve_kernels.py --dry-run --out /tmp/k.jsonl   (CPU, tiny, reference only)

One decoder layer's seven projections at llama-1b dims (hidden 2048, q/o 2048, k/v 512, gate/up 8192,
down 8192 -> 2048), bf16, r = 16 adapters in a bank of 32 slots + slot 0 (the layout SlotBank keeps).
Cases: decode (64 rows x 1 token) and prefill (4096 tokens: 8 rows x 512, or 32 x 128 for 32 adapters)
with 0 (base only: the matmuls alone, as the server runs when no row has an adapter), 1, 8 and 32
adapters (rows dealt round-robin over the adapters, shuffled), and a weighted stack (k = 2) over 32.
Timed: the seven `x @ W^T (+ lora_delta)` of a layer, eager (Python launches counted) and replayed
from a CUDA graph (device time: how a graph-captured decode step runs). vs_base = base time / time,
the throughput share of base-only that the layer's linears keep. lora_gbs: adapter bytes that the
case must read (each distinct slot's A and B once) over the time added to the base. err: ||triton -
reference|| / ||reference|| (bf16 both) on the case's inputs, summed over the projections.
One JSON line per (case, implementation) on stdout and in --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

DIMS = {"llama-1b": dict(hidden=2048, kv=512, mlp=8192, r=16, slots=32, rows=64, prefill_rows=8, tokens=4096),
        "tiny": dict(hidden=64, kv=16, mlp=128, r=4, slots=32, rows=4, prefill_rows=2, tokens=64)}  # --dry-run
CASES = [("decode", 0, 1), ("decode", 1, 1), ("decode", 8, 1), ("decode", 32, 1), ("decode", 32, 2),
         ("prefill", 0, 1), ("prefill", 1, 1), ("prefill", 8, 1), ("prefill", 32, 1), ("prefill", 32, 2)]


def projections(d: dict) -> dict[str, tuple[int, int]]:
    h, kv, m = d["hidden"], d["kv"], d["mlp"]
    return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, m), "up": (h, m), "down": (m, h)}


def make_layer(d: dict, dtype, dev):
    """Per projection: base weight W (out, in), slot bank A (S, r, in), B (S, out, r), slot 0 zero."""
    g = torch.Generator(device=dev).manual_seed(0)
    layer = {}
    for name, (din, dout) in projections(d).items():
        W = (torch.randn(dout, din, generator=g, device=dev) * 0.02).to(dtype)
        A = (torch.randn(d["slots"] + 1, d["r"], din, generator=g, device=dev) / din ** 0.5).to(dtype)
        B = (torch.randn(d["slots"] + 1, dout, d["r"], generator=g, device=dev) * 0.02).to(dtype)
        A[0], B[0] = 0, 0
        layer[name] = (W, A, B)
    return layer


def make_batch(d: dict, mode: str, n: int, k: int, dtype, dev):
    """x per input width, idx (b, k), coef (b, k), and (b, s)."""
    b = d["rows"] if mode == "decode" else max(d["prefill_rows"], n)  # prefill: one row per adapter at least
    s = 1 if mode == "decode" else d["tokens"] // b
    g = torch.Generator(device="cpu").manual_seed(1)
    slots = (torch.arange(b) % max(n, 1) + 1)[torch.randperm(b, generator=g)] if n else torch.zeros(b, dtype=torch.long)
    idx = slots[:, None].repeat(1, k)
    if k > 1:  # the stack's other entries: other adapters, equal weights
        idx[:, 1:] = (idx[:, 1:] - 1 + torch.arange(1, k) * 7) % max(n, 1) + 1
    coef = torch.full((b, k), 2.0 / k)  # weight x alpha / r (alpha 32, r 16)
    xs = {w: torch.randn(b, s, w, generator=g).to(dev, dtype) for w in (d["hidden"], d["mlp"])}
    return xs, idx.to(dev), coef.to(dev), (b, s)


def layer_fn(layer, xs, idx, coef, impl):
    """The seven projections of one layer; impl None = base only; impl "folded": each projection as one matmul
    with the slots' A folded under W plus one expand launch (triton_lora.folded_decode, decode only)."""
    if impl == "folded":
        from lorakit.kernels import triton_lora

        ext = {name: triton_lora.fold_weight(W, A) for name, (W, A, B) in layer.items()}

        def run_folded():
            return [triton_lora.folded_decode(xs[W.shape[1]][:, 0], ext[name], W.shape[0], B, idx, coef)
                    for name, (W, A, B) in layer.items()]
        return run_folded

    if isinstance(impl, str) and impl.startswith("grouped["):  # the grouped kernels with another GATHER config
        from lorakit.kernels import triton_lora

        cfg = dict(triton_lora.GATHER, **{k: int(v) for k, v in (kv.split("=") for kv in impl[8:-1].split(","))})
        inner = layer_fn(layer, xs, idx, coef, "grouped")

        def run_cfg():
            saved = triton_lora.GATHER
            triton_lora.GATHER = cfg
            try:
                return inner()
            finally:
                triton_lora.GATHER = saved
        return run_cfg
    if impl in ("inplace", "grouped"):
        from lorakit import kernels

        groups = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]] if impl == "grouped" else [[n] for n in layer]

        def run_grouped():
            outs = {}
            for names in groups:
                x = xs[layer[names[0]][0].shape[1]]
                ys = [x @ layer[n][0].T for n in names]
                if len(names) == 1:
                    kernels.lora_add(ys[0], x, layer[names[0]][1], layer[names[0]][2], idx, coef)
                else:
                    kernels.lora_add_group(ys, x, [layer[n][1] for n in names],
                                           [layer[n][2] for n in names], idx, coef)
                outs.update(zip(names, ys))
            return [outs[n] for n in layer]
        return run_grouped

    def run():
        outs = []
        for W, A, B in layer.values():
            x = xs[W.shape[1]]
            y = x @ W.T
            if impl is not None:
                y = y + impl(x, A, B, idx, coef)
            outs.append(y)
        return outs
    return run


def time_eager(fn, iters: int, cuda: bool) -> float:
    """Median ms of one call over `iters` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_graph(fn, iters: int, reps: int = 5) -> float:
    """ms of one call, from a CUDA graph holding `iters` calls, median over `reps` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(times)


def gather_with(triton_lora, cfg: dict):
    """triton_lora.lora_delta with the decode kernels' GATHER config replaced by `cfg` for the call (a graph
    captured from it keeps the launches that config made)."""
    def impl(*a, **kw):
        saved = triton_lora.GATHER
        triton_lora.GATHER = cfg
        try:
            return triton_lora.lora_delta(*a, **kw)
        finally:
            triton_lora.GATHER = saved
    return impl


def lora_bytes(layer, idx, coef) -> int:
    used = torch.unique(idx[(idx > 0) & (coef != 0)]).numel()
    return sum(used * (A[0].numel() + B[0].numel()) * A.element_size() for _, A, B in layer.values())


def rel_err(layer, xs, idx, coef, impl, ref) -> float:
    num = den = 0.0
    for W, A, B in layer.values():
        x = xs[W.shape[1]]
        want = ref(x, A, B, idx, coef).double()
        num += float((impl(x, A, B, idx, coef).double() - want).norm() ** 2)
        den += float(want.norm() ** 2)
    return (num / den) ** 0.5 if den else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="", help="JSONL file for the results (also printed)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, reference only")
    ap.add_argument("--iters", type=int, default=0, help="timed calls per case (default 20, dry run 5)")
    ap.add_argument("--cases", default="", help="comma-separated mode:adapters[:k], e.g. decode:32,prefill:8")
    ap.add_argument("--folded", action="store_true", help="also the folded decode experiment (decode cases)")
    ap.add_argument("--grouped", action="store_true", help="also the in-place adds (lora_add per projection, as "
                    "the engine runs) and the grouped kernels (q/k/v and gate/up in one shrink and one expand)")
    ap.add_argument("--gather", default="", help="extra decode kernel configs to time, ';'-separated, each "
                    "comma-separated GATHER keys, e.g. 'BK=128,BM=8,BO=128,target=2048;BK=64,target=4096'")
    args = ap.parse_args(argv)
    from lorakit.kernels import reference

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on a CPU)")
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    d = DIMS["tiny" if args.dry_run else "llama-1b"]
    iters = args.iters or (5 if args.dry_run else 20)
    impls = {"reference": reference.lora_delta}
    meta = dict(tool="lorakit", bench="gpu_serve_kernels", shape="tiny" if args.dry_run else "llama-1b",
                dtype=str(dtype)[6:], r=d["r"], slots=d["slots"], torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu", date=datetime.date.today().isoformat())
    if cuda:
        import triton

        from lorakit.kernels import triton_lora
        impls["triton"] = triton_lora.lora_delta
        meta["triton"] = triton.__version__
        for spec in filter(None, args.gather.split(";")):
            cfg = dict(triton_lora.GATHER, **{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
            impls[f"triton[{spec}]"] = gather_with(triton_lora, cfg)
    cases = CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int((c.split(":") + ["1"])[2])) for c in args.cases.split(",")]
    layer = make_layer(d, dtype, dev)
    fh = open(args.out, "w") if args.out else None
    base_ms: dict[str, tuple[float, float | None]] = {}
    t_start = time.perf_counter()
    try:
        for mode, n, k in cases:
            xs, idx, coef, (b, s) = make_batch(d, mode, n, k, dtype, dev)
            extra = [("folded", "folded")] if args.folded and cuda and mode == "decode" and n else []
            grouped = ["inplace", "grouped"] + [f"grouped[{g}]" for g in filter(None, args.gather.split(";")) if cuda]
            extra += [(v, v) for v in grouped if args.grouped and mode == "decode" and n]
            for name, impl in ([("base", None)] if n == 0 else list(impls.items()) + extra):
                fn = layer_fn(layer, xs, idx, coef, impl)
                eager = time_eager(fn, iters, cuda)
                graph = time_graph(fn, iters) if cuda else None
                if n == 0:
                    base_ms[mode] = (eager, graph)
                row = dict(meta, case=f"{mode}-{n}" + (f"-stack{k}" if k > 1 else ""), mode=mode, adapters=n,
                           k=k, rows=b, seq=s, impl=name, ms_eager=round(eager, 4),
                           ms_graph=None if graph is None else round(graph, 4))
                if mode in base_ms and n:
                    be, bg = base_ms[mode]
                    row.update(vs_base_eager=round(be / eager, 3),
                               vs_base_graph=None if graph is None else round(bg / graph, 3))
                    added = (graph if graph is not None else eager) - (bg if graph is not None else be)
                    row["lora_gbs"] = round(lora_bytes(layer, idx, coef) / added / 1e6, 1) if added > 0 else None
                if name.startswith("triton"):
                    row["err"] = rel_err(layer, xs, idx, coef, impl, reference.lora_delta)
                elif name == "inplace" or name.startswith("grouped"):  # outputs against base + reference, one rounding less
                    want = layer_fn(layer, xs, idx, coef, reference.lora_delta)()
                    num = sum(float((a.double() - w.double()).norm() ** 2) for a, w in zip(fn(), want))
                    den = sum(float((w.double() - (xs[W.shape[1]] @ W.T).double()).norm() ** 2)
                              for w, (W, _, _) in zip(want, layer.values()))
                    row["err"] = (num / den) ** 0.5
                line = json.dumps(row)
                print(line, flush=True)
                if fh:
                    fh.write(line + "\n")
                    fh.flush()
    finally:
        if fh:
            fh.close()
    print(f"# {len(cases)} cases in {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
