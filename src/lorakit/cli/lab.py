"""`lorakit compose`, `lorakit sweep` and `lorakit estimate`: thin front ends of adapters/compose.py and lab/."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.config import COMPOSE_METHODS
from lorakit.lab.sweep import DEFAULT_RANKS, DEFAULT_TARGETS, SweepOptions, run_sweep


def _add_compose(subparsers) -> None:
    p = subparsers.add_parser("compose", help="combine adapters into one (linear, cat, svd, ties, dare)",
                              description="Combine adapters into one adapter file (linear: the exact weighted sum of the deltas; cat, svd, ties, dare).")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="an adapter directory and its weight (default 1.0); repeat for each adapter")
    p.add_argument("--method", default="linear", choices=COMPOSE_METHODS)
    p.add_argument("--rank", type=int, default=None, help="target rank for svd/ties/dare (default: largest input)")
    p.add_argument("--density", type=float, default=0.5, help="fraction kept by ties/dare (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="dare's random drop seed")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="compose adapters whose bases have equal shapes but different weights or names")
    p.add_argument("-o", "--output", required=True, help="output adapter directory")
    p.add_argument("--quiet", action="store_true", help="print nothing (errors still go to stderr)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from lorakit.adapters.compose import compose, parse_spec

    specs = [parse_spec(s) for s in args.adapter]
    res = compose(specs, args.method, rank=args.rank, density=args.density, seed=args.seed,
                  allow_base_mismatch=args.allow_base_mismatch)
    res.save(args.output)
    rep = res.report
    if args.quiet:
        return 0
    worst = max(rep["rel_error"], key=rep["rel_error"].get)
    print(f"composed {len(specs)} adapters with {rep['method']}: {rep['modules']} modules, rank {rep['rank']}"
          f" (max {rep['max_rank']}) -> {args.output}")
    print(f"relative Frobenius error: overall {rep['rel_error_overall']:.3e}, worst {rep['rel_error_max']:.3e}"
          f" ({worst})")
    return 0


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


def cmd_sweep(args) -> int:
    o = SweepOptions(data=args.data, eval_data=args.eval_data, general=args.general, model=args.model,
                     dtype=args.dtype, ranks=_ints(args.ranks),
                     targets=[t.strip() for t in args.targets.split(",") if t.strip()], full=args.full,
                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, full_lr=args.full_lr,
                     alpha_ratio=args.alpha_ratio, warmup_ratio=args.warmup_ratio, train_rows=args.train_rows,
                     eval_rows=args.eval_rows, general_rows=args.general_rows, max_new_tokens=args.max_new_tokens,
                     max_len=args.max_len, template=args.template, seed=args.seed, threads=args.threads)
    if not o.eval_data:
        raise ValueError("--eval-data is required: held-out rows for loss, accuracy and behaviour change")
    try:
        results = run_sweep(o, args.output, progress=not args.quiet, max_runs=args.max_runs,
                            plots=not args.no_plots)
    except RuntimeError as e:  # a run failed: its log says why; the finished runs are kept
        print(f"lorakit sweep: {e}\nre-run the same command to resume", file=sys.stderr)
        return 1
    done = sum(1 for r in results if r is not None)
    print(f"{done}/{len(results)} runs done; report: {Path(args.output) / 'report.md'}")
    return 0


def _add_lab(sub) -> None:
    p = sub.add_parser("sweep", help="LoRA at several ranks and target sets vs full fine-tuning: report + plots")
    p.add_argument("--model", default="embedded", help="'embedded' (default), a local HF model dir")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16")
    p.add_argument("--data", required=True, help="training rows (JSONL/CSV, completion-style for accuracy)")
    p.add_argument("--eval-data", help="held-out rows: loss, exact-match accuracy, answers changed, KL")
    p.add_argument("--general", help="general text rows unrelated to the task (forgetting: loss before vs "
                                     "after), e.g. data/general/general.jsonl")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="comma-separated LoRA ranks")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated target sets: attn, mlp, qv, all-linear, or modules joined by '+'")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="include full fine-tuning (default: yes)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the same budget for all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--full-lr", type=float, default=3e-5, help="full fine-tuning learning rate")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio * r (default 2)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--train-rows", type=int, default=0, help="use the first N training rows (0 = all)")
    p.add_argument("--eval-rows", type=int, default=100, help="first N held-out rows (0 = all)")
    p.add_argument("--general-rows", type=int, default=0, help="first N general-text rows (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--template", default="auto", help="auto, chat or plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="OMP threads per run (0 = torch's default)")
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (resume later)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("-o", "--output", required=True, help="sweep directory (re-run the command to resume)")
    p.set_defaults(func=cmd_sweep)

    e = sub.add_parser("estimate", help="predicted trainable params, optimizer state and peak memory: "
                                        "LoRA, QLoRA, full fine-tuning")
    e.add_argument("--model", default="embedded", help="'embedded', a local HF model dir, or a config.json")
    e.add_argument("--r", type=int, default=16)
    e.add_argument("--targets", default="all-linear", help="all-linear, attn, mlp, qv, or modules joined by ','")
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--seq", type=int, default=512)
    e.add_argument("--dtype", default="float32", help="weights/compute dtype for LoRA and full: float32, bfloat16")
    e.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    e.add_argument("--shards", type=int, default=1, help="FSDP processes (per-GPU share of weights, gradients and "
                                                          "AdamW state; --batch is per GPU)")
    e.add_argument("--offload", choices=["none", "params"], default="none",
                   help="FSDP's CPU offload (lorakit train --offload params): the shards, gradients and AdamW state "
                        "in host memory; prints the host bytes a process")
    e.add_argument("--adapter-state", choices=["shard", "replicate"], default="shard",
                   help="FSDP: adapters sharded, or whole on every GPU (lorakit train --adapter-state)")
    e.add_argument("--measure", action="store_true",
                   help="also train 2 real steps on random tokens (in a subprocess) and print the measured peak")
    e.add_argument("--device", default="cpu", help="where --measure trains: cpu (peak RSS) or cuda (allocator peak)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_estimate)




def cmd_estimate(args) -> int:
    from lorakit.lab.estimate import METHODS, arch_of, estimate, format_estimates, load_config, measure, parse_targets

    targets = parse_targets(args.targets)
    arch = arch_of(load_config(args.model), args.model)
    replicate = args.adapter_state == "replicate"  # adapters only: full fine-tuning shards every weight
    ests = [estimate(arch, m, args.r, args.batch, args.seq, targets, args.dtype, args.checkpointing, args.shards,
                     args.offload == "params", "replicate" if replicate and m != "full" else "shard")
            for m in METHODS]
    measured = {}
    if args.measure:
        if args.device == "cpu" and (args.dtype != "float32" or args.checkpointing):
            raise ValueError("--measure on the CPU trains in float32 without checkpointing; drop --dtype/"
                             "--checkpointing, or measure on a GPU with --device cuda")
        for m in ("lora", "full"):
            measured[m] = measure(args.model, m, args.r, args.batch, args.seq, targets, device=args.device,
                                  dtype=args.dtype, checkpointing=args.checkpointing)
    if args.json:
        print(json.dumps({"model": args.model, "r": args.r, "targets": targets, "batch": args.batch,
                          "seq": args.seq, "dtype": args.dtype,
                          "estimates": [e.to_dict() for e in ests], "measured": measured}, indent=2))
        return 0
    head = (f"{arch.name}: {arch.params:,} parameters; r={args.r}, targets={targets}, batch {args.batch} x "
            f"seq {args.seq}, {args.dtype}" + (", checkpointing" if args.checkpointing else "")
            + (f", FSDP over {args.shards} (per GPU)" if args.shards > 1 else "")
            + (", CPU offload" if args.offload == "params" else "") + (", adapters replicated" if replicate else ""))
    print(format_estimates(ests, head))
    for m, res in measured.items():
        pred = next(e for e in ests if e.method == m).total / 2 ** 20
        print(f"measured {m} ({args.device}): peak {res['measured_mib']:.0f} MiB = base weights + the rise during "
              f"2 training steps (predicted {pred:.0f} MiB, {100 * (res['measured_mib'] / pred - 1):+.0f}%)")
    return 0


def register(sub) -> None:
    _add_compose(sub)
    _add_lab(sub)
