"""bench/gpu_serve.py's cases beyond mixed adapters: two-adapter stacks, many adapters under Zipf traffic through the
slot bank, and PEFT's mixed-batch generate as a peer."""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gpu_serve_lib import (adapter_bytes, engine_pass, make_adapter, make_prompts, ms, run_engine_case,
                           scratch_dir, start_engine, summarize, write_adapter)


def uses_for(adapters, n: int, rows: int, stack: int = 1, weights=(1.0, 0.5)):
    """Request i names adapter i % n (stack 2: and adapter (i + 1) % n, weighted 1.0 and 0.5); n = 0: the base."""
    from lorakit.serve.request import AdapterUse

    use = [AdapterUse(f"a{j}", (lambda a=a: a)) for j, a in enumerate(adapters[:n])]
    if not use:
        return [[] for _ in range(rows)]
    out = []
    for i in range(rows):
        picked = [use[(i + j) % n] for j in range(stack)]
        out.append([AdapterUse(u.key, u.load, w) for u, w in zip(picked, weights)])
    return out


def stack_case(model, adapters, n: int, args) -> dict:
    """Every request names two adapters with weights (a stack: the exact sum of their weight changes)."""
    prompts = make_prompts(args.rows, args, model.config.vocab_size)
    t0, times, info = run_engine_case(model, prompts, uses_for(adapters, n, args.rows, stack=2), args, n)
    return dict(api="engine", adapters=n, stack=2, stack_weights=[1.0, 0.5], **summarize(t0, times),
                graphs=info.get("graphs"), steps=info.get("decode_steps"),
                   measured=info.get("pass"), compile_failures=info.get("compile_failures"))


# ---------------------------------------------------------------- many adapters, Zipf traffic
def write_many(model, n: int, log) -> tuple[Path, str, float, int]:
    """n random adapters written to a folder as PEFT writes them (drawn on the device, written by 8 threads).
    -> (folder, "tmpfs" | "disk", seconds, bytes per adapter)."""
    one = adapter_bytes(make_adapter(model, 10_000))
    root, kind = scratch_dir(n * one)
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        futs = []
        for i in range(n):
            futs.append(pool.submit(write_adapter, make_adapter(model, 10_000 + i), root / f"z{i:04d}"))
            if len(futs) >= 32:  # bounded: at most 32 drawn adapters wait in host memory
                futs.pop(0).result()
        for f in futs:
            f.result()
    secs = time.perf_counter() - t
    log(f"# wrote {n} adapters ({n * one / 2**30:.2f} GiB, {kind}) in {secs:.1f} s")
    return root, kind, secs, one


def zipf_case(model, n: int, args, log) -> list[dict]:
    """`n` adapters in a folder; requests pick one by Zipf(1.0) over their ranks (rank k with weight 1/k); the
    engine holds args.zipf_slots of them on the device and reads the others from the folder as they are needed
    (serve/residency.py: a loader thread reads a request's files when it is submitted; a slot is written when it
    is admitted, evicting the least recently used unpinned adapter). The same engine then runs the same request
    count with args.zipf_ref adapters dealt round-robin from the same folder: the row it is compared with.
    Adapter load time: read (loader thread: the folder's files -> host tensors) and slot (engine thread: waiting
    for that read if unfinished, checking the tensors, writing them into the slot), per load."""
    from lorakit.adapters.peft_files import read_adapter
    from lorakit.serve.decoder import BUCKETS
    from lorakit.serve.request import AdapterUse

    root, kind, write_s, one = write_many(model, n, log)
    reads, slots = [], []

    def use(i: int) -> AdapterUse:
        path = root / f"z{i:04d}"

        def load():
            t = time.perf_counter()
            af = read_adapter(path)
            reads.append(time.perf_counter() - t)
            return af
        return AdapterUse(f"z{i}", load)

    count = args.zipf_requests or 4 * args.rows
    rng = random.Random(11)
    picks = rng.choices(range(n), weights=[1 / (k + 1) for k in range(n)], k=count)
    prompts = make_prompts(count, args, model.config.vocab_size)
    eng = start_engine(model, args, args.zipf_slots)
    acquire = eng.bank.acquire

    def timed_acquire(key, load):
        cold = key not in eng.bank.resident
        t = time.perf_counter()
        slot = acquire(key, load)
        if cold:
            slots.append(time.perf_counter() - t)
        return slot
    eng.bank.acquire = timed_acquire
    out = []
    try:
        ref = [[use(i % args.zipf_ref)] for i in range(count)]
        # warm-up: the ref's loads, and a graph for every batch size a pass may decode at (requests whose files
        # are still being read join later, so Zipf's batches take sizes the others never do)
        for k in [b for b in BUCKETS if b < args.rows] + [min(count, max(args.rows, args.zipf_ref))]:
            engine_pass(eng, prompts[:k], ref[:k], 2)  # the last: every ref adapter loaded
        for case, uses in ((f"zipf-ref-{args.zipf_ref}", ref), (f"zipf-{n}", [[use(p)] for p in picks])):
            reads.clear()
            slots.clear()
            loads0 = eng.residency.loads
            t0, times = engine_pass(eng, prompts, uses, args.new)
            row = dict(case=case, api="engine", adapters=args.zipf_ref if out == [] else n,
                       distinct=len({u[0].key for u in uses}), requests=count, slots=args.zipf_slots,
                       **summarize(t0, times), loads=eng.residency.loads - loads0, read_ms_p50=ms(reads, .5),
                       read_ms_p99=ms(reads, .99), load_ms_p50=ms(slots, .5), load_ms_p99=ms(slots, .99),
                       load_ms_max=ms(slots, 1.0), adapter_bytes=one, folder=kind, write_s=round(write_s, 1))
            if out:
                row["vs_ref"] = round(row["e2e_tok_s"] / out[0]["e2e_tok_s"], 3)
            out.append(row)
    finally:
        eng.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


# ---------------------------------------------------------------- PEFT's mixed batch
def peft_case(model, adapters, n: int, args, sync) -> dict:
    """PEFT's PeftModel with the same n adapters (written in the PEFT layout, loaded as PEFT loads them) and
    `generate(adapter_names=[...])`: row i runs adapter i % n, the same prompts, greedy, exactly args.new tokens.
    PEFT's defaults otherwise (its dynamic cache; adapters upcast to fp32). The model is given back unwrapped."""
    import peft
    from peft import PeftModel

    from lorakit.core.inject import unload

    unload(model)  # the engines' slot-routing wrappers out: PEFT wraps plain nn.Linear modules
    dev = next(model.parameters()).device
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-peft-"))
    try:
        paths = [write_adapter(adapters[i], tmp / f"a{i}") for i in range(n)]
        t = time.perf_counter()
        pm = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
        for i in range(1, n):
            pm.load_adapter(str(paths[i]), adapter_name=f"a{i}")
        load_s = time.perf_counter() - t
        lora_dtype = next(p.dtype for name, p in pm.named_parameters() if "lora_A" in name)
        ids = torch.tensor(make_prompts(args.rows, args, model.config.vocab_size), device=dev)
        names = [f"a{i % n}" for i in range(args.rows)]
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        with torch.no_grad():
            pm.generate(input_ids=ids[:4], adapter_names=names[:4], max_new_tokens=4, **{
                **kw, "attention_mask": kw["attention_mask"][:4]})  # warm-up
            sync()
            t0 = time.perf_counter()
            out = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=args.new, min_new_tokens=args.new,
                              **kw)
            sync()
        dt = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        pm.unload()  # the base model's own modules back in place
        return dict(api="peft", adapters=n, peft=peft.__version__, lora_dtype=str(lora_dtype)[6:],
                    load_s=round(load_s, 2), total_s=round(dt, 3), new_tokens=new,
                    e2e_tok_s=round(args.rows * new / dt, 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
