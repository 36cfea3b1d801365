"""The core subcommands: train, eval, generate, merge, inspect, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.runs import DONE


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct), a local HF model dir, a hub id already in the local "
                        "Hugging Face cache, or a .gguf file (nothing is downloaded)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _adapter_spec(spec: str) -> tuple[str, float]:
    """'path' or 'path:weight' -> (path, weight)."""
    path, sep, w = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(w)
        except ValueError:
            raise ValueError(f"adapter weight {w!r} in {spec!r} is not a number") from None
    return spec, 1.0


def load_model_and_adapters(args, adapters: list[str] | None = None, trainable: bool = False, mixture_ok: bool = True,
                            quant: str | None = None):
    """The base with `adapters` (dirs, 'dir:weight') active, or with one mixture dir (lorakit train-router).
    `quant` ("nf4"): the base's linear layers in 4 bits, as `lorakit train --quantize` held them."""
    from lorakit.adapters.peft_files import load_adapter
    from lorakit.adapters.mixtures import is_mixture, load_mixture
    from lorakit.core.inject import set_active
    from lorakit.models import load_base

    mixes = [a for a in adapters or [] if is_mixture(a)]
    if mixes and (len(adapters) > 1 or not mixture_ok):
        raise ValueError(f"{mixes[0]!r} is a mixture: it runs alone" + ("" if mixture_ok else
                         ", and its per-token gates cannot be merged into the weights"))
    model, tok = load_base(args.model, dtype=args.dtype, device=args.device, quant=quant)
    if mixes:
        load_mixture(model, mixes[0])
        return model, tok
    weights = {}
    for i, spec in enumerate(adapters or []):
        path, w = _adapter_spec(spec)
        name = f"a{i}" if len(adapters) > 1 else "default"
        load_adapter(model, path, name, trainable=trainable, activate=False)
        weights[name] = w
    if weights:
        set_active(model, weights)
    return model, tok


def split_targets(s: str):
    return s if "," not in s and (s in ("all-linear", "attn", "mlp", "qv") or any(c in s for c in "*().|\\[")) \
        else [t.strip() for t in s.split(",") if t.strip()]


def _adapter_meta(adapters: list[str] | None) -> dict[str, dict]:
    """adapter name (as `load_model_and_adapters` names them) -> its lorakit metadata ({} for a PEFT adapter); for a mixture, how
    its router's rows were rendered."""
    from lorakit.adapters.peft_files import read_metadata
    from lorakit.adapters.mixtures import is_mixture, mixture_metadata

    specs = adapters or []
    return {(f"a{i}" if len(specs) > 1 else "default") + f" ({_adapter_spec(s)[0]})":
            (mixture_metadata if is_mixture(_adapter_spec(s)[0]) else read_metadata)(_adapter_spec(s)[0])
            for i, s in enumerate(specs)}


def _template(args, tok) -> str:
    """--template if given, else the adapters' recorded one ('auto' without); mismatches warn on stderr."""
    from lorakit.templates import pick_template

    template, warnings = pick_template(tok, args.template, _adapter_meta(args.adapter))
    for w in warnings:
        print(f"lorakit {args.command}: warning: {w}", file=sys.stderr)
    return template


def say(args, msg: str) -> None:
    """A status line (stdout) unless --quiet."""
    if not getattr(args, "quiet", False):
        print(msg, flush=True)


def _template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", default=None, choices=["auto", "chat", "plain"],
                   help="how prompts are rendered: chat (the model's chat template, a user turn) or plain text; "
                        "auto: chat if the model has a template (default: the template the adapter was trained "
                        "with, recorded in its metadata; auto without one)")


# ------------------------------------------------------------------ eval
def cmd_eval(args) -> int:
    from lorakit.train.data import load_rows
    from lorakit.train.evaluate import evaluate, format_report
    from lorakit.models import load_base

    rows, _ = load_rows(args.data)
    if args.limit:
        rows = rows[:args.limit]
    model, tok = load_model_and_adapters(args, args.adapter)
    template = _template(args, tok)
    base = None
    if args.base_model:
        base, _ = load_base(args.base_model, dtype=args.dtype, device=args.device)
    say(args, f"eval: {len(rows)} rows of {args.data}, prompts rendered {template}")
    rep = evaluate(model, tok, rows, template, args.max_new_tokens, args.batch_size, base_model=base,
                   compare=bool(args.adapter or base is not None), progress=not args.quiet)
    if args.json:
        from lorakit.files import atomic_write_json

        atomic_write_json(args.json, rep.to_dict())
    if not (args.quiet and args.json):  # --quiet with --json: the file is the output
        print(format_report(rep, n_examples=0 if args.quiet else args.examples))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity, exact match; before/after and behaviour change")
    model_args(p)
    p.add_argument("--adapter", action="append", help="adapter dir (repeat to stack; 'dir:weight' sets a weight), "
                                                      "or one mixture dir (lorakit train-router)")
    p.add_argument("--base-model", help="compare against this model instead of the adapter-free base "
                                        "(e.g. the original model when --model is a full fine-tune)")
    p.add_argument("--data", required=True)
    _template_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only (0: all)")
    p.add_argument("--examples", type=int, default=5, help="example answers to print")
    p.add_argument("--json", help="write the full report (metrics and every answer) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines; with --json, no report")
    p.set_defaults(func=cmd_eval)


# ------------------------------------------------------------------ generate
def cmd_generate(args) -> int:
    from lorakit.generate import generate

    if args.chat:
        if args.template not in (None, "chat"):
            raise ValueError(f"--chat and --template {args.template} disagree; pass one of them")
        args.template = "chat"
    model, tok = load_model_and_adapters(args, args.adapter)
    template = _template(args, tok)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt or lines on stdin")
    inputs = [[{"role": "user", "content": p}] for p in prompts] if template == "chat" else prompts
    outs = generate(model, tok, inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    seed=args.seed)
    for o in outs:
        print(o if not args.json else json.dumps({"text": o}))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the base or with adapters")
    model_args(p)
    p.add_argument("--adapter", action="append", help="adapter dir (repeat to stack; 'dir:weight' sets a weight), "
                                                      "or one mixture dir (lorakit train-router)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several; default: stdin lines)")
    _template_arg(p)
    p.add_argument("--chat", action="store_true", help="the same as --template chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per output line")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the answers are still printed)")
    p.set_defaults(func=cmd_generate)


# ------------------------------------------------------------------ merge
def base_quant(adapters: list[str], asked: str = "auto") -> str | None:
    """The 4-bit format the adapters' base is merged from: `asked` ("nf4" or "none"), or with "auto" what their
    metadata says they were trained on (`lorakit train --quantize` records base_quant)."""
    if asked != "auto":
        return None if asked == "none" else asked
    from lorakit.adapters.mixtures import is_mixture
    from lorakit.adapters.peft_files import read_metadata

    paths = [_adapter_spec(a)[0] for a in adapters]
    quants = {read_metadata(p).get("base_quant") for p in paths if not is_mixture(p)}
    if len(quants) > 1:
        raise ValueError(f"adapters {paths} were trained on different bases ({sorted(map(str, quants))}): pass "
                         f"--base-quant nf4 or none to say which base they are merged into")
    return next(iter(quants), None)


def merged_model(args, adapters: list[str]):
    """The base with `adapters` merged. A QLoRA adapter (base_quant) merges into the base it was trained on:
    the 4-bit weights dequantized to fp32, the deltas added in fp32, rounded once to --save-dtype (default
    bfloat16; core/qlora_merge.py). Otherwise into the full-precision base as loaded. -> (model, tok, quant)."""
    from lorakit.core.inject import unload
    from lorakit.models import resolve_dtype

    quant = base_quant(adapters, getattr(args, "base_quant", "auto"))
    model, tok = load_model_and_adapters(args, adapters, mixture_ok=False, quant=quant)
    dev = next(model.parameters()).device
    if quant:
        from lorakit.core.qlora_merge import merge_qlora

        merge_qlora(model, resolve_dtype(args.save_dtype or "bfloat16", dev))
    else:
        unload(model, merge_active=True)
        if args.save_dtype:
            model.to(resolve_dtype(args.save_dtype, dev))
    return model, tok, quant


def cmd_merge(args) -> int:
    from lorakit.models import save_hf_dir

    model, tok, quant = merged_model(args, args.adapter)
    save_hf_dir(model, tok, Path(args.output))
    how = f" (into the dequantized {quant} base the adapter was trained on)" if quant else ""
    say(args, f"wrote merged model to {args.output}{how} (loads with transformers alone)")
    return 0


def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-quant", default="auto", choices=["auto", "nf4", "none"],
                   help="merge into the base dequantized from this 4-bit format (the weights a QLoRA adapter was "
                        "trained on: dequantized to fp32, the delta added in fp32, rounded once) or into the "
                        "full-precision base (none); auto: what the adapter's metadata records (default: auto)")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold adapters into the base and export a Hugging Face model dir")
    model_args(p)
    p.add_argument("--adapter", action="append", required=True, help="adapter dir ('dir:weight'; repeat to stack)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--save-dtype", help="dtype of the saved weights (default: the load dtype; bfloat16 when "
                                        "merging into a 4-bit base)")
    merge_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)


# ------------------------------------------------------------------ inspect
def _short_name(path: str) -> str:
    """A module's name without its parents: 'q_proj'; an index keeps its parent's name ('to_out.0')."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def inspect_adapter(path: str) -> dict:
    from lorakit.adapters.peft_files import read_adapter

    af = read_adapter(path)
    mods = af.modules()
    ranks = sorted({t["lora_A"].shape[0] for t in mods.values()})
    fp = af.fingerprint or {}
    cfg = af.config
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.startswith("adapter_"))
    return {
        "path": str(path), "r": cfg.r, "ranks": ranks, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora, "dropout": cfg.dropout, "targets": cfg.targets,
        "modules": len(mods), "module_names": sorted({_short_name(p) for p in mods}),
        "params": af.num_params(), "bytes": size,
        "base": af.peft_config.get("base_model_name_or_path"),
        "base_architecture": fp.get("architecture"), "base_shape_hash": fp.get("shape_hash"),
        "lorakit_version": af.header.get("lorakit.version"), "metadata": af.metadata,
    }


def inspect_mixture(path: str) -> dict:
    """A mixture (lorakit train-router): the adapters it gates, their hashes and whether each is still there
    unchanged, the base it was trained on, its size."""
    from lorakit.adapters.mixtures import adapter_status, read_mixture

    mf = read_mixture(path)
    done = Path(path) / DONE
    return {"path": str(path), "kind": "mixture", "adapters": mf.names, "temperature": mf.temperature,
            "routed_layers": len(mf.layers), "params": mf.num_params(),
            "adapter_files": [{k: s[k] for k in ("name", "sha256", "dir", "status")} for s in adapter_status(mf)],
            "base": mf.base.get("name"), "base_architecture": mf.base.get("architecture"),
            "base_shape_hash": mf.base.get("shape_hash"), "base_weight_hash": mf.base.get("weight_hash"),
            "lorakit_version": mf.manifest.get("lorakit_version"),
            "training": json.loads(done.read_text()) if done.exists() else None}


def inspect_router(path: str) -> dict:
    """A bare router directory (router.json, no mixture.json): the adapters it gates and its size."""
    from safetensors import safe_open

    cfg = json.loads((Path(path) / "router.json").read_text())
    with safe_open(str(Path(path) / "router.safetensors"), "pt") as f:
        params = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys())
        layers = len({k.rsplit(".", 1)[0] for k in f.keys()})
    done = Path(path) / DONE
    return {"path": str(path), "kind": "mixture router", "adapters": cfg["adapters"],
            "temperature": cfg.get("temperature"), "routed_layers": layers, "params": params,
            "training": json.loads(done.read_text()) if done.exists() else None}


def cmd_inspect(args) -> int:
    from lorakit.adapters.mixtures import is_mixture

    info = inspect_mixture(args.adapter) if is_mixture(args.adapter) else inspect_router(args.adapter) \
        if (Path(args.adapter) / "router.json").exists() else inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "adapter_files":
            for a in v:
                print(f"{'  ' + a['name']:<18} {a['status']:<8} sha256 {a['sha256'][:16]}  {a['dir']}")
            continue
        print(f"{k:<18} {v}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="an adapter's ranks, targets, parameter count and base fingerprint; "
                                       "a mixture's adapters (present and unchanged?), base and size")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def register(sub) -> None:
    for add in (_add_eval, _add_generate, _add_merge, _add_inspect):
        add(sub)
