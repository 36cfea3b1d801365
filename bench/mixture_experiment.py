"""Mixture of LoRAs on a mixed task set: does a per-token router beat each single adapter and the uniform mix?

Two text tasks in one format on the embedded SmolLM2-135M (CPU):
  "reverse: cat dog sun\\n=>"  ->  " sun dog cat"      (word order reversed)
  "upper: cat dog sun\\n=>"    ->  " CAT DOG SUN"      (words upper-cased)
One LoRA adapter is trained per task (on that task only), then frozen; a router (lorakit.core.mixture) is
trained on a mixed set; everything is scored on a held-out mixed set (word tuples never seen in training):
completion loss (mean NLL per completion token) and exact match of greedy generations.

    PYTHONPATH=src python bench/mixture_experiment.py --out bench/results/mixture-cpu.json

The adapters go on the top `--layers` transformer layers only, so backward stops there (CPU budget).
The small training loop below is this experiment's own (lorakit.train.loop is a separate feature).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, add_adapter, load_adapter, read_adapter, save_adapter, set_active
from lorakit.generate import generate_ids
from lorakit.core.inject import lora_layers, mark_trainable, set_routing
from lorakit.config import TrainConfig
from lorakit.core.mixture import Router, lm_loss, uniform_routing
from lorakit.train.router import train_router
from lorakit.models import load_base

WORDS = ("cat dog sun moon tree fish bird car book door hat cup milk rain snow wind fire stone road ship king "
         "queen horse apple river house water bread chair table lamp phone clock paper glass shoe coat bed box "
         "key ring bell star cloud rock sand salt egg pen map cake farm bank city girl boy man wolf bear lion "
         "duck frog goat sheep pig cow bee fox owl bus train plane boat bike wall roof gate park lake hill sea "
         "leaf rose corn rice tea song game ball gold coin baby friend army heart hand head eye face hair").split()
TASKS = {"reverse": lambda ws: " ".join(reversed(ws)), "upper": lambda ws: " ".join(w.upper() for w in ws)}


def make_rows(task: str, tuples: list[tuple[str, ...]]) -> list[dict]:
    return [{"task": task, "prompt": f"{task}: {' '.join(t)}\n=>", "answer": " " + TASKS[task](list(t))}
            for t in tuples]


def split_tuples(seed: int, n_train: int, n_test: int) -> tuple[list, list]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n_train + n_test:
        t = tuple(rng.sample(WORDS, rng.choice([3, 4])))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out[:n_train], out[n_train:]


def encode(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    eos = tok.eos_token_id
    return [(tok(r["prompt"], add_special_tokens=False).input_ids,
             tok(r["answer"], add_special_tokens=False).input_ids + [eos]) for r in rows]


def collate(pairs, pad: int) -> dict:
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):  # right padding; loss on the completion only
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(pairs, batch_size: int, pad: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([pairs[j] for j in order[i:i + batch_size]], pad)


def train_adapter(model, name, pairs, args, pad) -> list[float]:
    set_active(model, name)
    mark_trainable(model, name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    it = batches(pairs, args.batch, pad, args.seed)
    losses = []
    for step in range(args.steps):
        b = next(it)
        loss = lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            print(f"  {name} step {step + 1}/{args.steps} loss {sum(losses[-20:]) / 20:.4f}", flush=True)
    mark_trainable(model, None)
    return losses


@torch.no_grad()
def evaluate(model, tok, rows, pairs, pad, bs=32, exact=True) -> dict:
    """Per task and overall: mean completion NLL per token and greedy exact match."""
    nll = {t: [0.0, 0] for t in TASKS}
    for i in range(0, len(pairs), bs):
        b = collate(pairs[i:i + bs], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        lab = b["labels"][:, 1:]
        tok_nll = -lp.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * (lab != -100)  # (b, s-1)
        for r, row in enumerate(rows[i:i + bs]):
            nll[row["task"]][0] += tok_nll[r].sum().item()
            nll[row["task"]][1] += int((lab[r] != -100).sum())
    res = {f"loss_{t}": s / n for t, (s, n) in nll.items()}
    res["loss_mixed"] = sum(s for s, _ in nll.values()) / sum(n for _, n in nll.values())
    if not exact:
        return res
    outs = generate_ids(model, tok, [p for p, _ in pairs], max_new_tokens=12, batch_size=bs)
    hits = {t: [0, 0] for t in TASKS}
    for row, o in zip(rows, outs):
        hits[row["task"]][0] += int(tok.decode(o) == row["answer"])
        hits[row["task"]][1] += 1
    res |= {f"exact_{t}": h / n for t, (h, n) in hits.items()}
    res["exact_mixed"] = sum(h for h, _ in hits.values()) / sum(n for _, n in hits.values())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120, help="training steps per adapter")
    ap.add_argument("--router-steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--router-lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--layers", type=int, default=10, help="adapt the top N transformer layers")
    ap.add_argument("--n-train", type=int, default=400, help="examples per task for its adapter")
    ap.add_argument("--n-router", type=int, default=200, help="examples per task for the router")
    ap.add_argument("--n-test", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="save the trained adapters here, reuse them if present")
    ap.add_argument("--write-data", metavar="DIR", help="only write the study's rows as prompt/completion JSONL "
                    "(reverse.jsonl, upper.jsonl: adapter training; router.jsonl: the mixed router set; test.jsonl: "
                    "the held-out mixed set) for the CLI run in docs/mixture.md, then exit")
    ap.add_argument("--cli-summary", metavar="DIR", help="summarise bench/mixture_cli.sh's eval_*.json in DIR "
                    "(per task exact match, loss) into DIR/summary.json and print it, then exit")
    ap.add_argument("--seconds", type=float, help="with --cli-summary: the run's wall time, recorded")
    ap.add_argument("--baseline-loss-only", action="store_true",
                    help="score the baselines by loss only (no generation): a quick rerun of the router alone")
    args = ap.parse_args()
    if args.write_data:
        return write_data(args)
    if args.cli_summary:
        return cli_summary(Path(args.cli_summary), args.seconds)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_base("embedded", dtype="float32", device="cpu")
    pad = tok.pad_token_id
    n_layers = model.config.num_hidden_layers
    top = "|".join(str(i) for i in range(n_layers - args.layers, n_layers))
    targets = rf"model\.layers\.({top})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

    data = study_rows(args)
    curves = {}
    for task in TASKS:
        cached = Path(args.cache) / task if args.cache else None
        if cached and (cached / "adapter_config.json").exists():  # reuse adapters trained with these args
            load_adapter(model, cached, task)
            curves[task] = read_adapter(cached).metadata["curve"]
            continue
        add_adapter(model, LoraConfig(r=args.r, alpha=2 * args.r, targets=targets), task)
        curves[task] = train_adapter(model, task, encode(tok, data[task]["adapter"]), args, pad)
        if cached:
            save_adapter(model, cached, task, metadata={"curve": curves[task], "args": vars(args)})
    model.eval()
    test_rows = [r for t in TASKS for r in data[t]["test"]]
    test_pairs = encode(tok, test_rows)
    names = list(TASKS)
    results = {}
    for label, active in [("base", None), *[(f"only_{t}", t) for t in names], ("uniform_mix", uniform_routing(names)),
                          ("sum", {n: 1.0 for n in names})]:
        set_active(model, active)
        results[label] = evaluate(model, tok, test_rows, test_pairs, pad, exact=not args.baseline_loss_only)
        print(label, json.dumps(results[label]), flush=True)
    set_active(model, names)  # the router decides the weights; the adapters just need to be present
    router = Router(model, names)
    router_rows = [r for t in TASKS for r in data[t]["router"]]
    router_curve = train_router(model, router, encode(tok, router_rows), tok=tok, progress=True,
                                cfg=TrainConfig(max_steps=args.router_steps, lr=args.router_lr, batch_size=args.batch,
                                                seed=args.seed + 1, warmup_ratio=0.0, max_grad_norm=0.0,
                                                group_by_length=False)).losses
    router.attach(model)
    results["router"] = evaluate(model, tok, test_rows, test_pairs, pad)
    print("router", json.dumps(results["router"]), flush=True)
    gates = gate_summary(model, router, tok, data)
    out = {"case": "mixture_of_loras", "machine": "cpu-2core-24GiB", "threads": args.threads, "args": vars(args),
           "model": "SmolLM2-135M-Instruct (embedded)", "targets": targets, "results": results,
           "mean_gate_per_task": gates, "adapter_loss_first_last": {t: [c[0], c[-1]] for t, c in curves.items()},
           "router_loss_first_last": [router_curve[0], router_curve[-1]], "router_params": sum(
               p.numel() for p in router.parameters()), "seconds": round(time.time() - t0)}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


def study_rows(args) -> dict:
    """task -> {"adapter", "router", "test"} rows, exactly as main() draws them."""
    data = {}
    for k, task in enumerate(TASKS):
        train_t, test_t = split_tuples(args.seed * 100 + k, args.n_train + args.n_router, args.n_test)
        data[task] = {"adapter": make_rows(task, train_t[:args.n_train]),
                      "router": make_rows(task, train_t[args.n_train:]), "test": make_rows(task, test_t)}
    return data


def write_data(args) -> None:
    out = Path(args.write_data)
    out.mkdir(parents=True, exist_ok=True)
    data = study_rows(args)

    def dump(name, rows):
        (out / name).write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n"
                                        for r in rows))
    for task in TASKS:
        dump(f"{task}.jsonl", data[task]["adapter"])
        dump(f"test_{task}.jsonl", data[task]["test"])
    dump("router.jsonl", [r for t in TASKS for r in data[t]["router"]])
    dump("test.jsonl", [r for t in TASKS for r in data[t]["test"]])
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.jsonl')))} to {out}")


def cli_summary(run: Path, seconds: float | None) -> None:
    """Per case (eval_<case>.json of `lorakit eval`): loss, and exact match overall and per task (the row's
    instruction word), with the base (every report's "before") as its own row."""
    import os
    import platform

    table = {}
    for f in sorted(run.glob("eval_*.json")):
        rep = json.loads(f.read_text())
        ex = rep["examples"]
        for case, side in (("base", "before"), (f.stem[len("eval_"):], "after")):
            row = {"loss_mixed": rep[side]["loss"], "exact_mixed": rep[side]["accuracy"]}
            for task in TASKS:
                mine = [e for e in ex if e["prompt"].startswith(task + ":")]
                row[f"exact_{task}"] = sum(" ".join(e[side].split()) == " ".join(e["reference"].split())
                                           for e in mine) / max(len(mine), 1)
            table[case] = row
    out = {"case": "mixture_of_loras_cli", "machine": f"cpu-{os.cpu_count()}core ({platform.machine()})",
           "date": time.strftime("%Y-%m-%d"), "threads": 1, "seconds": seconds, "results": table,
           "commands": "bench/mixture_cli.sh"}
    (run / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


@torch.no_grad()
def gate_summary(model, router, tok, data) -> dict:
    """Mean gates at the last prompt token, per task (32 held-out rows), in the first and the last routed layer."""
    routed = [layer for _, layer in lora_layers(model) if id(layer) in router._layer_key]
    picks = {"first_routed_layer": routed[0], "last_routed_layer": routed[-1]}
    out = {}
    for task in TASKS:
        seen = {k: [] for k in picks}

        def grab(layer, x):
            for k, want in picks.items():
                if layer is want:
                    seen[k].append(router.gate_values(layer, x)[:, -1].mean(0))
            return router(layer, x)

        set_routing(model, grab)
        for p, _ in encode(tok, data[task]["test"][:32]):
            model(input_ids=torch.tensor([p]))
        out[task] = {k: dict(zip(router.names, torch.stack(v).mean(0).tolist())) for k, v in seen.items()}
    router.attach(model)
    return out


if __name__ == "__main__":
    main()
