"""`lorakit` command line. Subcommands live next to the code they drive: each feature module
exposes `register(subparsers)`, which adds its parser(s) with `set_defaults(func=...)`; heavy
imports happen inside the handlers so `lorakit --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that add subcommands (in help order)
COMMAND_MODULES = [
    "lorakit.cli.commands",        # train, eval, generate, merge, inspect
    "lorakit.adapters.compose",         # compose
    "lorakit.lab.sweep",           # sweep, estimate
    "lorakit.cli.serve",       # serve, adapters
    "lorakit.cli.ui",          # ui (the dashboard without a model)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
