"""`lorakit` command line. Subcommands live next to the code they drive: each feature module
exposes `register(subparsers)`, which adds its parser(s) with `set_defaults(func=...)`; heavy
imports happen inside the handlers so `lorakit --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# modules that add subcommands (in help order)
COMMAND_MODULES = [
    "lorakit.cli.train",           # train, train-router
    "lorakit.cli.commands",        # eval, generate, merge, inspect
    "lorakit.adapters.compose",         # compose
    "lorakit.lab.sweep",           # sweep, estimate
    "lorakit.cli.serve",       # serve, adapters
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, adapters and serving")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # feature not installed in this build
            raise
        mod.register(sub)
    return parser


def _log_to_stderr(quiet: bool) -> None:
    """The library logs through `logging` ("lorakit.*"); the CLI shows INFO and up, or errors only with --quiet."""
    logger = logging.getLogger("lorakit")
    if not any(getattr(h, "_lorakit_cli", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._lorakit_cli = True
        logger.addHandler(h)
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m lorakit -- train ...` (some Pythons pass the separator on)
        argv = argv[1:]
    args = parser.parse_args(argv)
    args.argv = argv  # e.g. for `train --nproc` to start torchrun
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _log_to_stderr(quiet=bool(getattr(args, "quiet", False)))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # torchrun
        print(f"lorakit {args.command}: error: {rank}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
