"""`lorakit train` and `lorakit train-router`: thin front ends of the one training loop (lorakit.train.loop).

`lorakit train --nproc N ...` starts `torchrun --standalone --nproc-per-node N -m lorakit train ...` (the same
arguments without --nproc); a process that torchrun started joins its group here (lorakit.train.distributed)."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from lorakit.cli.commands import model_args, split_targets
from lorakit.runs import EVAL

log = logging.getLogger("lorakit.cli")

TRAIN_FLAGS = (("lr", float, "peak learning rate"), ("epochs", float, "passes over the data"),
               ("max-steps", int, "optimizer steps (>0 overrides --epochs)"), ("batch-size", int, "rows a micro-batch"),
               ("grad-accum", int, "micro-batches an optimizer step"), ("max-len", int, "tokens a row (truncated)"),
               ("seed", int, "data order and adapter init"), ("eval-every", int, "steps between held-out losses"),
               ("save-every", int, "steps between checkpoints"), ("warmup-ratio", float, "share of steps warming up"),
               ("weight-decay", float, "AdamW weight decay"), ("max-grad-norm", float, "gradient clipping (0: off)"),
               ("threads", int, "torch CPU threads (0: the cores this process may use)"),
               ("activation-memory-budget", float, "compiled layers: share of saved activations kept (lower: "
                "recompute cheap ops in backward, less memory)"))


def _train_config(args, file_cfg: dict):
    from lorakit.config import TrainConfig

    train_kw = dict(file_cfg.get("train", {}))
    for flag, _, _ in TRAIN_FLAGS:
        v = getattr(args, flag.replace("-", "_"))
        if v is not None:
            train_kw[flag.replace("-", "_")] = v
    for k in ("backend", "recompute", "parallel", "offload", "adapter_state"):
        if getattr(args, k, None) is not None:
            train_kw[k] = getattr(args, k)
    if getattr(args, "grad_checkpointing", False):
        train_kw["recompute"] = "all"
    if getattr(args, "no_group_by_length", False):
        train_kw["group_by_length"] = False
    if getattr(args, "fused_mlp", False):
        train_kw["fused_mlp"] = True
    if getattr(args, "no_share_prefix", False):
        train_kw["share_prefix"] = False
    if getattr(args, "no_pack", False):
        train_kw["pack"] = False
    if getattr(args, "full", False):
        train_kw["full"] = True
    return TrainConfig.from_dict(train_kw)


def _load_for_training(args, ctx=None, parallel: str = "auto"):
    """The base on this process's device. Under torchrun: cuda:LOCAL_RANK (or cpu), and on the CPU first where
    FSDP may shard it (fsdp, or auto, which decides by its size): fully_shard moves each shard to the device."""
    from lorakit.models import load_base, resolve_device, resolve_dtype

    if ctx is None or ctx.world == 1:
        return load_base(args.model, dtype=args.dtype, device=args.device, quant=args.quantize)
    dtype = resolve_dtype(args.dtype, ctx.device)
    if parallel == "fsdp" and args.quantize:  # each rank reads and quantizes only its shards (train/shard_load.py)
        from lorakit.train.shard_load import load_meta

        return load_meta(args.model, dtype, ctx.device)
    device = "cpu" if parallel != "ddp" and not args.quantize else ctx.device
    return load_base(args.model, dtype=dtype, device=str(resolve_device(str(device))), quant=args.quantize)


def _spawn(args) -> int:
    """Run this command under torchrun on `args.nproc` local processes; -> torchrun's exit status."""
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "lorakit", "--", *argv]  # `--`: torchrun's parser would take e.g. --r for its --rdzv-*/--role
    rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc:
        print(f"lorakit train: error: a training process failed (torchrun exited {rc}); its message is above",
              file=sys.stderr)
    return rc


def cmd_train(args) -> int:
    from lorakit.train import distributed

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if (args.nproc or 1) > 1 and not distributed.launched():
        return _spawn(args)
    ctx = distributed.init(args.device, offload=_offload(args) == "params")
    try:
        if not ctx.main:  # one voice: rank 0 logs and prints; every rank still reports its own error
            logging.getLogger("lorakit").setLevel(logging.ERROR)
            args.quiet = True
        return _train(args, ctx)
    finally:
        distributed.teardown()


def _offload(args) -> str:
    """--offload, else the config file's train.offload (the process group needs to know before the run starts)."""
    if args.offload is not None or not args.config:
        return args.offload or "none"
    from lorakit.config import load_config_file

    return str(load_config_file(args.config).get("train", {}).get("offload", "none"))


def _train(args, ctx) -> int:
    from lorakit.config import LoraConfig, load_config_file
    from lorakit.files import atomic_write_json
    from lorakit.models import base_reference
    from lorakit.templates import template_info
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.evaluate import evaluate, format_report
    from lorakit.train.loop import train

    file_cfg = load_config_file(args.config) if args.config else {}
    lora_kw = {**(LoraConfig.peft_defaults().to_dict() if args.preset == "peft" else {}), **file_cfg.get("lora", {})}
    for k, v in (("r", args.r), ("alpha", args.alpha), ("dropout", args.dropout), ("use_rslora", args.rslora or None),
                 ("use_dora", args.dora or None)):
        if v is not None:
            lora_kw[k] = v
    if args.targets is not None:
        lora_kw["targets"] = split_targets(args.targets)
    lora_cfg = LoraConfig.from_dict(lora_kw)
    train_cfg = _train_config(args, file_cfg)
    if train_cfg.full:  # every weight trains, without an adapter: adapter variants would be silently ignored
        variants = [f for f, on in (("--quantize nf4", args.quantize), ("--dora", args.dora),
                                    ("--rslora", args.rslora)) if on]
        if variants:
            raise ValueError(f"--full trains every weight of the model, without an adapter: {', '.join(variants)} "
                             f"{'does' if len(variants) == 1 else 'do'} not apply to it; drop "
                             f"{'it' if len(variants) == 1 else 'them'} or drop --full")
        shape = [f for f, v in (("--r", args.r), ("--alpha", args.alpha), ("--dropout", args.dropout),
                                ("--targets", args.targets)) if v is not None]
        if shape:  # scripts pass one set of flags to LoRA and full runs alike: say so, do not stop
            log.warning("--full: %s shape(s) an adapter and %s not used", ", ".join(shape),
                        "is" if len(shape) == 1 else "are")
        if file_cfg.get("lora"):  # a shared settings file: its train section applies, so say what does not
            log.warning("--full: the 'lora' section of %s (%s) does not apply to full fine-tuning; its 'train' "
                        "section does", args.config, ", ".join(sorted(file_cfg["lora"])))
    if ctx.world > 1 and args.compare:
        raise ValueError("--compare runs in one process: train with torchrun, then run `lorakit eval`")
    rows, fmt = load_rows(args.data)  # validate the data before anything is loaded or written
    eval_rows = load_rows(args.eval_data)[0] if args.eval_data else None
    model, tok = _load_for_training(args, ctx, train_cfg.parallel)
    examples = build_examples(tok, rows, args.template, train_cfg.max_len)
    eval_examples = build_examples(tok, eval_rows, args.template, train_cfg.max_len) if eval_rows else None
    log.info("data: %d %s rows from %s%s", len(rows), fmt, args.data,
             f", {len(eval_rows)} eval rows" if eval_rows else "")
    compare = bool(eval_rows and args.compare and not train_cfg.full)
    # --compare measures the held-out loss itself (with the base's beside it): no duplicate final eval in train
    train_eval = None if compare and not train_cfg.eval_every else eval_examples
    meta = {"data": str(args.data), "rows": len(rows), **template_info(tok, args.template)}  # how rows were rendered
    if args.quantize:
        meta["base_quant"] = args.quantize
    res = train(model, tok, examples, args.output, lora_cfg, train_cfg, eval_examples=train_eval,
                resume=args.resume, progress=not args.quiet, base_name=base_reference(args.model), metadata=meta,
                save_final=not args.no_save)
    if not args.quiet:
        what = "metrics in" if args.no_save else "wrote"  # --no-save: no adapter or model, only the run's metrics
        print(f"done: {res.steps} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
              f"{res.tokens_per_s:.0f} tokens/s; {what} {args.output}")
    if compare:
        rep = evaluate(model, tok, eval_rows, args.template, args.max_new_tokens, batch_size=32)
        if not args.quiet:
            print(format_report(rep))
        atomic_write_json(Path(args.output) / EVAL, rep.to_dict())
    return 0


def _loop_args(p: argparse.ArgumentParser) -> None:
    """Flags every training command shares (defaults: TrainConfig)."""
    from lorakit.config import TrainConfig

    d = TrainConfig()
    for flag, typ, what in TRAIN_FLAGS:
        p.add_argument(f"--{flag}", type=typ, help=f"{what} (default: {getattr(d, flag.replace('-', '_'))})")
    p.add_argument("--backend", choices=["auto", "plain", "fast"],
                   help="how the loss is computed: fast (fused Llama layers, CUDA) or plain; auto picks fast where "
                        "it can and says why not (default: auto)")
    p.add_argument("--recompute", help="layers whose activations are recomputed in backward: N or 'all' (default: 0)")
    p.add_argument("--grad-checkpointing", action="store_true", help="same as --recompute all")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun / --nproc: ddp (replicate the base, all-reduce the adapters' gradients), "
                        "fsdp (shard every weight), auto: ddp if the base fits one device easily (default: auto)")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="batch rows in plain shuffled order (default: rows of similar length together)")
    p.add_argument("--fused-mlp", action="store_true",
                   help="fast backend: run the MLP and its LoRA through fused kernels that keep fewer activations "
                        "(-4 GiB on a 1B model at 8 x 2048, ~3%% slower on an H200; default: off)")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="run every row's tokens in full (default: the leading tokens all rows of a batch share, "
                        "such as the chat template's system prompt, run once; plain backend, one process)")
    p.add_argument("--no-pack", action="store_true",
                   help="pad each micro-batch's rows to its longest (default: rows concatenated without padding, "
                        "attention kept within each row, where the backend takes packed rows)")
    p.add_argument("--resume", action="store_true", help="continue from the output dir's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages, errors only")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA (or --full) on a JSONL/CSV data file")
    model_args(p)
    p.add_argument("--data", required=True, help="JSONL/CSV: prompt/completion, messages, alpaca or text rows")
    p.add_argument("--eval-data", help="held-out rows for periodic eval loss (and before/after with --compare)")
    p.add_argument("-o", "--output", required=True, help="output dir: adapter files, metrics.jsonl, checkpoints")
    p.add_argument("--config", help="YAML/JSON with 'lora' and 'train' sections (flags override it)")
    from lorakit.config import LoraConfig

    d = LoraConfig()
    targets = d.targets if isinstance(d.targets, str) else ",".join(d.targets)
    p.add_argument("--r", type=int, help=f"rank (default: {d.r})")
    p.add_argument("--alpha", type=float, help=f"scale numerator: the update is alpha/r B A (default: {d.alpha:g})")
    p.add_argument("--dropout", type=float, help=f"dropout on the adapter's input (default: {d.dropout:g})")
    p.add_argument("--targets", help="comma list (q_proj,v_proj), a regex, or all-linear / attn / mlp / qv "
                                     f"(default: {targets})")
    p.add_argument("--preset", choices=["lorakit", "peft"], default="lorakit",
                   help="starting values of r/alpha/dropout/targets: lorakit's (above) or HF PEFT's defaults "
                        "(r=8, alpha=8, q_proj,v_proj); flags and --config override them (default: lorakit)")
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dora", action="store_true", help="DoRA: learn a magnitude vector too")
    p.add_argument("--full", action="store_true", help="full fine-tuning (every weight), for comparison")
    p.add_argument("--quantize", choices=["nf4"], help="QLoRA: hold the frozen base's linear layers in 4-bit NF4")
    p.add_argument("--no-save", action="store_true",
                   help="write no adapter or model at the end, only metrics.jsonl (benchmarks, dry runs)")
    p.add_argument("--nproc", type=int, help="train on N local processes (GPUs) through torchrun; --batch-size is "
                                             "per process (multi-node: run torchrun yourself, docs/distributed.md)")
    p.add_argument("--offload", choices=["none", "params"],
                   help="--parallel fsdp: keep the shards (base, adapters), their gradients and AdamW state in host "
                        "memory, each unit copied to the GPU when it runs; AdamW steps on the CPU (default: none)")
    p.add_argument("--adapter-state", choices=["shard", "replicate"],
                   help="--parallel fsdp: shard the adapters and their AdamW state like every weight, or keep them "
                        "whole on every rank, their gradients all-reduced once a step (default: shard)")
    _loop_args(p)
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="how prompt/completion rows are rendered (auto: the chat template if the model has one)")
    p.add_argument("--compare", action="store_true", help="after training, evaluate before/after on --eval-data")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length for --compare (default: 32)")
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------ train-router
def _named(spec: str) -> tuple[str, str]:
    """'name=dir' or 'dir' (name: the directory's name) -> (name, dir)."""
    import re

    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).name
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"adapter directory {path!r} (in --adapters {spec!r}) does not exist")
    return name, path


def cmd_train_router(args) -> int:
    from lorakit.adapters.peft_files import fingerprint, load_adapter
    from lorakit.adapters.mixtures import write_mixture
    from lorakit.config import load_config_file
    from lorakit.core.inject import set_active
    from lorakit.core.mixture import Router
    from lorakit.models import model_name
    from lorakit.templates import template_info
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.router import train_router

    specs = [_named(s) for s in args.adapters.split(",") if s.strip()]
    if len(specs) < 2:
        raise ValueError(f"--adapters needs at least two adapter dirs to route between, got {args.adapters!r}")
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {names} repeat; name them with name=dir")
    file_cfg = load_config_file(args.config) if args.config else {}
    if "lr" not in file_cfg.get("train", {}) and args.lr is None:
        args.lr = 2e-3  # the router's own default: higher rates saturate the normalised gates
    if "warmup_ratio" not in file_cfg.get("train", {}) and args.warmup_ratio is None:
        args.warmup_ratio = 0.0
    cfg = _train_config(args, file_cfg)
    rows, fmt = load_rows(args.data)
    eval_rows = load_rows(args.eval_data)[0] if args.eval_data else None
    model, tok = _load_for_training(args)
    for name, path in specs:
        load_adapter(model, path, name, activate=False)
    set_active(model, names)
    examples = build_examples(tok, rows, args.template, cfg.max_len)
    eval_examples = build_examples(tok, eval_rows, args.template, cfg.max_len) if eval_rows else None
    router = Router(model, names, args.temperature)
    res = train_router(model, router, examples, args.output, cfg=cfg, tok=tok, eval_examples=eval_examples,
                       resume=args.resume, progress=not args.quiet,
                       metadata={"data": str(args.data), "adapters": dict(specs)})
    write_mixture(args.output, router, dict(specs), fingerprint(model), model_name(args.model),
                  template_info(tok, args.template))  # how its rows were rendered: eval/serve follow it
    if not args.quiet:
        print(f"done: {res.steps} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}; mixture of "
              f"{', '.join(names)} in {args.output}")
    return 0


def _add_train_router(sub) -> None:
    p = sub.add_parser("train-router", help="train a mixture-of-LoRAs router over frozen adapters (same loop)")
    model_args(p)
    p.add_argument("--adapters", required=True, help="comma list of adapter dirs (or name=dir) to route between")
    p.add_argument("--data", required=True, help="rows of the mixed tasks (same formats as train)")
    p.add_argument("--eval-data", help="held-out rows for eval loss")
    p.add_argument("-o", "--output", required=True, help="output dir: the mixture (router weights, mixture.json with "
                                                         "the adapters' names and hashes and the base), metrics")
    p.add_argument("--config", help="YAML/JSON with a 'train' section (flags override it)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the gates (default: 1.0)")
    p.add_argument("--quantize", choices=["nf4"], help="hold the frozen base's linear layers in 4-bit NF4")
    _loop_args(p)
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    p.set_defaults(func=cmd_train_router)


def register(sub) -> None:
    _add_train(sub)
    _add_train_router(sub)
