"""`lorakit` command line. Subcommands live next to the code they drive: each feature module
exposes `register(subparsers)`, which adds its parser(s) with `set_defaults(func=...)`; heavy
imports happen inside the handlers so `lorakit --help` stays fast."""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
import warnings

# modules that add subcommands (in help order)
COMMAND_MODULES = [
    "lorakit.cli.train",           # train, train-router
    "lorakit.cli.commands",        # eval, generate, merge, inspect
    "lorakit.cli.export",          # export (GGUF)
    "lorakit.cli.lab",             # compose, sweep, estimate
    "lorakit.cli.serve",       # serve, adapters
    "lorakit.cli.ui",          # ui (the dashboard without a model)
    "lorakit.cli.diffusion",   # diffusion-demo
]


def _says_nothing(default) -> bool:
    """None, an off switch or SUPPRESS; by identity: a default of 0 or 0.0 equals False but says something."""
    return default is None or default is False or default is argparse.SUPPRESS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where it says nothing (None, off switches) or the help
    text already states it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or _says_nothing(action.default) or "default" in h:
            return h
        return h + (" " if h else "") + "(default: %(default)s)"

    def _format_action(self, action):
        if action.help is None and action.option_strings and not _says_nothing(action.default):
            action = copy.copy(action)  # argparse shows no help line at all for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)
        # on every (sub)command, before or after its name; SUPPRESS: a subcommand's default does not undo
        # `lorakit --verbose train ...`
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="also show the libraries' warnings, log lines and model-loading bars")


def quiet_libraries(quiet: bool, verbose: bool = False) -> None:
    """What a CLI user should not see unless --verbose: the dependencies' warnings (deprecations, advice to
    library developers: a user can do nothing about them), transformers' log lines and its model-loading bars;
    lorakit's own warnings and progress bars stay. --quiet also hides lorakit's bars and info logs. An explicit
    -W/PYTHONWARNINGS wins over the warning filters."""
    if verbose:
        return
    if not sys.warnoptions:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"lorakit(\.|$)")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars read it
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger("lorakit").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already (a caller in-process): the variables came too late
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="LoRA fine-tuning, adapters and serving")
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream of the first call: an in-process caller
    (tests capturing output, notebooks) that runs several commands sees each one's messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _log_to_stderr(quiet: bool) -> None:
    """The library logs through `logging` ("lorakit.*"); the CLI shows INFO and up, or errors only with --quiet."""
    logger = logging.getLogger("lorakit")
    if not any(getattr(h, "_lorakit_cli", False) for h in logger.handlers):
        h = _StderrHandler()
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
    env_before = dict(os.environ)  # an in-process caller (tests, notebooks) gets its environment back
    logger = logging.getLogger("lorakit")  # ... and lorakit's logger as it was (level, propagation, handlers)
    log_before = (logger.level, logger.propagate, list(logger.handlers))
    quiet_libraries(bool(getattr(args, "quiet", False)), verbose=bool(getattr(args, "verbose", False)))
    _log_to_stderr(quiet=bool(getattr(args, "quiet", False)))
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # a bad value or file (OSError: unreadable, not permitted): one line
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # torchrun
        print(f"lorakit {args.command}: error: {rank}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for k in set(os.environ) - set(env_before):
            del os.environ[k]
        os.environ.update(env_before)
        logger.setLevel(log_before[0])
        logger.propagate, logger.handlers[:] = log_before[1], log_before[2]


if __name__ == "__main__":
    sys.exit(main())
