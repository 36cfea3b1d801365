"""`lorakit serve` and `lorakit adapters list|add|show|rollback|remove|eval`.

The registry file defaults to $LORAKIT_REGISTRY or ./lorakit-registry.sqlite; its adapter files live
next to it in <name>.store/. A postgresql:// URL instead is a registry several servers share
(adapters/registry_pg.py), its files in the content-addressed store --store (or $LORAKIT_STORE) names. API keys may come from $LORAKIT_API_KEYS (comma-separated) and
$LORAKIT_ADMIN_KEY instead of the command line (which other users can see in `ps`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_REGISTRY = "lorakit-registry.sqlite"


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=os.environ.get("LORAKIT_REGISTRY", DEFAULT_REGISTRY),
                   help="SQLite registry file, or a postgresql:// URL shared by several servers "
                        "(default: $LORAKIT_REGISTRY or ./%(default)s)")
    p.add_argument("--store", default=os.environ.get("LORAKIT_STORE"),
                   help="where adapter files live (default $LORAKIT_STORE; SQLite: <registry>.store/; PostgreSQL: "
                        "a directory on a shared filesystem or an fsspec URL, recorded in the database on first use)")


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters")
    s.add_argument("--model", default="embedded", help="base model: HF dir, .gguf, or 'embedded' (default)")
    _registry_arg(s)
    s.add_argument("--adapters", help="directory of adapter dirs to register at start (name = dir name; "
                                      "a changed one becomes a new version); mixture dirs in it become "
                                      "mix:<dir name>, pinned to the adapter versions they were trained on")
    s.add_argument("--api-key", action="append", default=None, help="inference key (repeatable); "
                   "default $LORAKIT_API_KEYS; none: inference is open")
    s.add_argument("--admin-key", default=os.environ.get("LORAKIT_ADMIN_KEY"),
                   help="key for /admin/* (default $LORAKIT_ADMIN_KEY; none: admin API disabled)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    dashboard_args(s)
    s.add_argument("--max-slots", type=int, default=16, help="adapters resident in memory at once (LRU)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    s.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank served (larger ones are "
                   "refused); slot memory grows with it")
    s.add_argument("--max-body-bytes", type=int, default=1_000_000)
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection has to send a request's "
                   "headers (slow clients are closed)")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take (408 after)")
    s.add_argument("--max-prompt-tokens", type=int, default=2048)
    s.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 1 on a machine of up to "
                   "4 usable cores, else half of them, at most 16: more threads fight the HTTP loop and other jobs)")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("adapters", help="the adapter registry: list, add, show, rollback, remove")
    asub = a.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = asub.add_parser("list", help="current version of every adapter")
    p.add_argument("--json", action="store_true")
    p = asub.add_parser("add", help="copy an adapter dir in as the next version (refused if it fits another base); "
                                    "a mixture dir becomes mix:<name>, pinned to the adapter versions of its hashes")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--model", help="base model, needed once to record the registry's base fingerprint")
    p.add_argument("--description", default="")
    p.add_argument("--metrics", help="JSON file of evaluation results to record with this version")
    p.add_argument("--force", action="store_true", help="accept an adapter trained on other base weights "
                                                        "of the same shapes (e.g. another dtype)")
    p = asub.add_parser("show", help="versions, files, base fingerprint and evaluations of an adapter")
    p.add_argument("name")
    p = asub.add_parser("rollback", help="make an earlier version current")
    p.add_argument("name")
    p.add_argument("--to", type=int, help="version number (default: the one before the current)")
    p = asub.add_parser("remove", help="remove an adapter (name) or one version (name@N)")
    p.add_argument("ref")
    p = asub.add_parser("eval", help="record evaluation metrics (JSON file) for name or name@N")
    p.add_argument("ref")
    p.add_argument("metrics")
    p = asub.add_parser("migrate", help="copy a SQLite registry into a PostgreSQL one (names, counters, versions, "
                                        "evaluations; files into the content-addressed --store)")
    p.add_argument("--from", dest="source", required=True, help="the SQLite registry file")
    p.add_argument("--to", dest="target", required=True, help="the postgresql:// URL")
    for p in asub.choices.values():
        _registry_arg(p)
    a.set_defaults(func=cmd_adapters)


def dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="web dashboard (at /): training runs to show (lorakit train -o dirs under it)")
    p.add_argument("--sweeps-dir", help="web dashboard: a lorakit sweep -o dir, or a dir holding several")


def dashboard_options(args):
    from lorakit.ui import UIOptions

    for flag, v in (("--runs-dir", args.runs_dir), ("--sweeps-dir", args.sweeps_dir)):
        if v and not Path(v).is_dir():
            raise FileNotFoundError(f"{flag} {v!r} is not a directory")
    return UIOptions(runs_dir=Path(args.runs_dir) if args.runs_dir else None,
                     sweeps_dir=Path(args.sweeps_dir) if args.sweeps_dir else None)


# ---------------------------------------------------------------- adapters
def _open_registry(path: str, model: str | None = None, store: str | None = None):
    from lorakit.adapters.registries import open_registry

    if model is None:
        return open_registry(path, store=store)
    from lorakit.adapters.peft_files import fingerprint
    from lorakit.models import load_base, model_name

    m, _ = load_base(model, device="cpu")
    return open_registry(path, base_fp=fingerprint(m), base_name=model_name(model), store=store)


def _read_metrics(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"metrics file {path!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics file {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"metrics file {path!r} must hold a non-empty JSON object")
    return data


def cmd_adapters(args) -> int:
    if args.action == "migrate":
        from lorakit.adapters.migrate import migrate
        from lorakit.adapters.pg import is_url, redact

        if not is_url(args.target):
            raise ValueError(f"--to {args.target!r}: expected a postgresql:// URL")
        n = migrate(args.source, args.target, args.store)
        print(f"migrated {n['names']} names, {n['versions']} versions, {n['evals']} evaluations from {args.source} "
              f"into {redact(args.target)} ({n['blobs_written']} files written to the store)")
        return 0
    reg = _open_registry(args.registry, getattr(args, "model", None), args.store)
    try:
        if args.action == "list":
            rows = reg.list()
            if args.json:
                print(json.dumps([v.to_json() for v in rows], indent=2))
            else:
                print(f"{'NAME':24} {'VERSION':>7} {'RANK':>5} {'PARAMS':>10}  ADDED")
                for v in rows:
                    added = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created_at))
                    r = "mix" if v.kind == "mixture" else str(v.config.get("r"))
                    pins = f"  over {', '.join(v.config['pinned'])}" if v.kind == "mixture" else ""
                    print(f"{v.name:24} {v.version:>7} {r:>5} {v.num_params:>10,}  {added}{pins}")
        elif args.action == "add":
            from lorakit.adapters.mixtures import add_mixture, is_mixture

            v = add_mixture(reg, args.name, args.path, description=args.description) if is_mixture(args.path) \
                else reg.add(args.name, args.path, description=args.description, force=args.force)
            if args.metrics:
                reg.add_eval(f"{v.name}@{v.version}", _read_metrics(args.metrics))
            print(f"added {v.name}@{v.version} (current) from {args.path}")
        elif args.action == "show":
            print(json.dumps(reg.describe(args.name), indent=2))
        elif args.action == "rollback":
            v = reg.rollback(args.name, args.to)
            print(f"{v.name}: current version is now {v.version}")
        elif args.action == "remove":
            gone = reg.remove(args.ref)
            print("removed " + ", ".join(f"{v.name}@{v.version}" for v in gone))
        elif args.action == "eval":
            reg.add_eval(args.ref, _read_metrics(args.metrics))
            print(f"recorded metrics for {args.ref}")
    finally:
        reg.close()
    return 0


# ---------------------------------------------------------------- serve
def _register_dir(reg, directory: str) -> list[str]:
    from lorakit.adapters.peft_files import CONFIG_NAME
    from lorakit.adapters.mixtures import add_mixture, is_mixture
    from lorakit.adapters.registry import NAME_RE

    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"adapters directory {directory!r} does not exist")
    added = []
    for d in sorted(p for p in root.iterdir() if (p / CONFIG_NAME).exists()):
        if not NAME_RE.fullmatch(d.name):
            print(f"skipping {str(d)!r}: not a valid adapter name", file=sys.stderr)
            continue
        try:
            v = reg.add(d.name, d, skip_if_current=True)
            added.append(f"{v.name}@{v.version}")
        except ValueError as e:  # one bad adapter must not stop the server
            print(f"skipping adapter {str(d)!r}: {e}", file=sys.stderr)
    for d in sorted(p for p in root.iterdir() if is_mixture(p)):  # after the adapters they are pinned to
        try:
            v = add_mixture(reg, d.name, d, skip_if_current=True)
            added.append(v.ref)
        except (ValueError, FileNotFoundError) as e:
            print(f"skipping mixture {str(d)!r}: {e}", file=sys.stderr)
    return added


def cmd_serve(args) -> int:
    import uvicorn

    from lorakit.adapters.peft_files import fingerprint
    from lorakit.config import ServeConfig
    from lorakit.models import load_base, model_name
    from lorakit.serve.app import build_app, make_state
    from lorakit.adapters.registries import open_registry
    from lorakit.serve.follow import follow
    from lorakit.serve.runtime import uvicorn_config

    keys = args.api_key or [k for k in os.environ.get("LORAKIT_API_KEYS", "").split(",") if k]
    cfg = ServeConfig(host=args.host, port=args.port, api_keys=keys, admin_key=args.admin_key,
                      registry=args.registry, max_slots=args.max_slots, max_batch=args.max_batch,
                      max_lora_rank=args.max_lora_rank, header_timeout=args.header_timeout,
                      body_timeout=args.body_timeout,
                      max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_new_tokens=args.max_new_tokens)
    for field_, v in (("max_slots", cfg.max_slots), ("max_batch", cfg.max_batch), ("max_lora_rank", cfg.max_lora_rank),
                      ("max_new_tokens", cfg.max_new_tokens), ("max_prompt_tokens", cfg.max_prompt_tokens)):
        if v < 1:
            raise ValueError(f"--{field_.replace('_', '-')} must be at least 1, got {v}")
    if not (cfg.header_timeout > 0 and cfg.body_timeout > 0):
        raise ValueError(f"--header-timeout and --body-timeout must be positive, got {cfg.header_timeout} and "
                         f"{cfg.body_timeout}")
    ui = dashboard_options(args)  # before the model loads: a wrong directory fails fast
    import torch

    from lorakit.serve.app import cpu_threads

    torch.set_num_threads(cpu_threads(args.threads))
    print(f"torch CPU threads: {torch.get_num_threads()}", file=sys.stderr)
    model, tok = load_base(args.model, dtype=args.dtype, device=args.device)
    name = model_name(args.model)
    if os.path.exists(args.model):  # a path: clients name the base by its directory (or file) name
        name = Path(args.model).resolve().stem if args.model.endswith(".gguf") else Path(args.model).resolve().name
    reg = open_registry(cfg.registry, base_fp=fingerprint(model), base_name=name, store=args.store)
    if args.adapters:
        print("adapters: " + (", ".join(_register_dir(reg, args.adapters)) or "none"), file=sys.stderr)
    if not keys:
        print("warning: no --api-key: inference is open to anyone who can reach the port", file=sys.stderr)
    state = make_state(model, tok, reg, cfg, name)
    state.follower = follow(state.engine, reg)  # a shared registry: drop slots of versions removed anywhere
    print(f"serving {name} on http://{cfg.host}:{cfg.port} (registry {reg.path}; dashboard at /)", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(build_app(state, ui), cfg.host, cfg.port, "info", cfg.header_timeout,
                                      timeout_graceful_shutdown=10)).run()
    finally:
        if state.follower is not None:
            state.follower.stop()
        state.engine.stop()
        reg.close()
    return 0
