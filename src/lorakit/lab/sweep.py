"""`lorakit sweep`: LoRA at several ranks and target sets, and full fine-tuning, on one dataset and step
budget, measured side by side (quality, cost, behaviour change, forgetting, the SVD of the full fine-tune's
weight change) -> results.csv, report.md and PNG plots.

Each run is a subprocess (`lorakit.lab.sweep_run`), which isolates its peak memory and makes resuming simple:
a run is done when its runs/<name>/result.json exists; a killed sweep starts again at the first run without
one (a half-finished run is redone from step 0). `lorakit estimate` is registered here too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.files import atomic_write_json

DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64]
DEFAULT_TARGETS = ["attn", "all-linear"]
PLAN = "sweep.json"


@dataclass
class SweepOptions:
    data: str
    eval_data: str | None = None
    general: str | None = None
    model: str = "embedded"
    dtype: str = "float32"
    ranks: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    full: bool = True
    steps: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    full_lr: float = 3e-5
    alpha_ratio: float = 2.0  # alpha = alpha_ratio * r: the same scale at every rank
    warmup_ratio: float = 0.1
    train_rows: int = 0  # 0 = all
    eval_rows: int = 100
    general_rows: int = 0
    max_new_tokens: int = 32
    max_len: int = 512
    template: str = "auto"
    seed: int = 0
    threads: int = 0  # 0 = torch's default

    def validate(self) -> None:
        for name in ("data", "eval_data", "general"):
            path = getattr(self, name)
            if path and not Path(path).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} file {path!r} does not exist")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} unknown; expected float32, bfloat16 or float16")
        if not self.ranks or any(r <= 0 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        if not self.targets and not self.full:
            raise ValueError("nothing to run: no target sets and --no-full")
        for k in ("steps", "batch_size", "max_new_tokens", "max_len"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")


def target_label(t: str) -> str:
    return {"all-linear": "all", "attn": "attn", "mlp": "mlp", "qv": "qv"}.get(t, t.replace("+", "_"))


def plan_runs(o: SweepOptions) -> list[dict]:
    """The runs in order: base, full fine-tuning, then LoRA per target set and rank."""
    from lorakit.lab.estimate import parse_targets

    common = {k: v for k, v in asdict(o).items() if k not in ("ranks", "targets", "full", "lr", "full_lr")}
    runs = [{**common, "name": "base", "kind": "base"}]
    if o.full:
        runs.append({**common, "name": "full", "kind": "full", "lr": o.full_lr})
    for t in o.targets:
        spec_t = parse_targets(t)
        for r in o.ranks:
            runs.append({**common, "name": f"lora-{target_label(t)}-r{r}", "kind": "lora", "r": r,
                         "alpha": o.alpha_ratio * r, "targets": spec_t, "lr": o.lr})
    return runs


def _check_plan(out: Path, o: SweepOptions) -> None:
    """A sweep directory belongs to one set of options; resuming with others would mix incomparable runs."""
    path = out / PLAN
    mine = json.loads(json.dumps(asdict(o)))
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{str(out)!r} holds a sweep made with other options (differing: {diff}); "
                             f"pass the same options to resume it, or a new output directory")
    else:
        atomic_write_json(path, mine)


class _Lock:
    """One sweep process per directory: a second one would run the same unfinished run twice."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(self.path.read_text().strip() or 0)
            if pid and _alive(pid):
                raise ValueError(f"another sweep (pid {pid}) is running in {str(self.path.parent)!r}; "
                                 f"wait for it or stop it, then re-run to resume") from None
            self.path.unlink()  # left by a sweep that was killed
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _steps_done(run_dir: Path) -> int:
    m = run_dir / "train" / "metrics.jsonl"
    try:
        return sum(1 for line in m.read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def _launch(spec: dict, run_dir: Path, threads: int, bar) -> None:
    """Run one spec in a subprocess, its output in run_dir/log.txt; follow its steps on the bar."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a half-finished run starts over
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with (run_dir / "log.txt").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit.lab.sweep_run", str(run_dir / "spec.json")],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            shown = 0
            while proc.poll() is None:
                time.sleep(1.0)
                if bar is not None:
                    done = _steps_done(run_dir)
                    bar.update(done - shown)
                    shown = done
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text()[-1500:]
        raise RuntimeError(f"sweep run {spec['name']!r} failed (exit {proc.returncode}); "
                           f"log {run_dir / 'log.txt'}:\n{tail}")
    if bar is not None:
        bar.update(spec.get("steps", 0) * (spec["kind"] != "base") - shown)


def run_sweep(o: SweepOptions, out: str | Path, progress: bool = True, max_runs: int = 0,
              plots: bool = True) -> list[dict]:
    """Run every unfinished run of the plan (at most `max_runs` of them when > 0), then write the report."""
    o.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, o)
    with _Lock(out):
        return _run_plan(o, out, plan_runs(o), progress, max_runs, plots)


def _run_plan(o: SweepOptions, out: Path, runs: list[dict], progress: bool, max_runs: int,
              plots: bool) -> list[dict]:
    from lorakit.lab.sweep_report import load_results, write_outputs
    from lorakit.lab.sweep_run import RESULT

    todo = [r for r in runs if not (out / "runs" / r["name"] / RESULT).exists()]
    n_done = len(runs) - len(todo)
    if max_runs:
        todo = todo[:max_runs]
    train_steps = sum(o.steps for r in todo if r["kind"] != "base")
    if progress:
        print(f"sweep: {len(runs)} runs, {n_done} done before, {len(todo)} to run now "
              f"({train_steps} training steps) -> {out}", flush=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=train_steps, unit="step", desc="sweep", dynamic_ncols=True,
                   mininterval=2.0 if sys.stderr.isatty() else 60.0)
    try:
        for i, spec in enumerate(todo):
            run_dir = out / "runs" / spec["name"]
            spec = {**spec, "run_dir": str(run_dir), "base_result": str(out / "runs" / "base" / RESULT),
                    "svd_ranks": sorted(set(o.ranks) | {1, 2, 4, 8, 16, 32, 64, 128})}
            if bar is not None:
                bar.set_description(f"sweep {spec['name']} ({i + 1}/{len(todo)})")
            _launch(spec, run_dir, o.threads, bar)
            res = json.loads((run_dir / RESULT).read_text())
            if progress:
                msg = f"{spec['name']}: accuracy {res['accuracy']:.2f}, held-out loss {res['eval_loss']:.4f}"
                if "train_seconds" in res:
                    msg += f", train {res['train_seconds']:.0f} s, peak {res.get('peak_mib') or 0:.0f} MiB"
                (bar.write if bar is not None else print)(msg)
            write_outputs(out, load_results(out, runs), o, plots=plots)  # a partial sweep has a report too
    finally:
        if bar is not None:
            bar.close()
    results = load_results(out, runs)
    write_outputs(out, results, o, plots=plots)
    return results


# ------------------------------------------------------------------ CLI
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


def register(sub) -> None:
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
    p.add_argument("--full", action=__import__("argparse").BooleanOptionalAction, default=True,
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
    e.add_argument("--measure", action="store_true",
                   help="also train 2 real steps on random tokens (in a subprocess) and print the measured peak")
    e.add_argument("--device", default="cpu", help="where --measure trains: cpu (peak RSS) or cuda (allocator peak)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_estimate)


def cmd_estimate(args) -> int:
    from lorakit.lab.estimate import cmd_estimate as run

    return run(args)
