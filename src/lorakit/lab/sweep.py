"""`lorakit sweep`: LoRA at several ranks and target sets, and full fine-tuning, on one dataset and step
budget, measured side by side (quality, cost, behaviour change, forgetting, the SVD of the full fine-tune's
weight change) -> results.csv, report.md and PNG plots.

Each run is a subprocess (`lorakit.lab.sweep_run`), which isolates its peak memory and makes resuming simple:
a run is done when its runs/<name>/result.json exists; a killed sweep starts again at the first run without
one (a half-finished run is redone from step 0). `lorakit estimate` is registered here too.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.files import atomic_write_json, pid_alive
from lorakit.runs import METRICS

log = logging.getLogger("lorakit.lab")

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
            if pid and pid_alive(pid):
                raise ValueError(f"another sweep (pid {pid}) is running in {str(self.path.parent)!r}; "
                                 f"wait for it or stop it, then re-run to resume") from None
            self.path.unlink()  # left by a sweep that was killed
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _steps_done(run_dir: Path) -> int:
    m = run_dir / "train" / METRICS
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
    src = str(Path(__file__).resolve().parents[2])  # the directory that holds the lorakit package
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with (run_dir / "log.txt").open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit.lab.sweep_run", str(run_dir / "spec.json")],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
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
        log.info("sweep: %d runs, %d done before, %d to run now (%d training steps) -> %s", len(runs), n_done,
                 len(todo), train_steps, out)
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
