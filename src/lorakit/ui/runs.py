"""Training runs on disk, as `lorakit train` leaves them: metrics.jsonl (one record per step, eval records
with eval_loss), train_config.json, train_done.json when finished, eval.json after --compare, the adapter's
adapter_config.json. Runs are the directory given (if it is one) and its direct subdirectories; a run is
looked up by name in that listing, never by joining a path from the request."""
from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters.refs import CONFIG_NAME as ADAPTER_CONFIG  # noqa: F401  (the pages read it from here)
from lorakit.runs import CONFIG, DONE, EVAL, METRICS  # noqa: F401  (the pages read them from here)

RUNNING_WITHIN_S = 120.0  # metrics written this recently and no train_done.json: the run is going
MAX_METRICS_BYTES = 256 << 20  # a metrics.jsonl larger than this is shown as unreadable, not read
MAX_JSON_BYTES = 16 << 20  # train_config.json, eval.json, train_done.json


class Unreadable(ValueError):
    """A run file that is not a readable UTF-8 text file of sane size: its run is listed as 'unreadable'."""


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    status: str  # running | done | stopped | unreadable
    updated: float
    problem: str = ""  # why an unreadable run could not be read

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if "eval_loss" in r]

    def last(self, key: str):
        return next((r[key] for r in reversed(self.records) if key in r), None)

    def config(self) -> dict | None:
        return read_json(self.path / CONFIG)

    def total_steps(self) -> int | None:
        cfg = self.config() or {}
        return cfg.get("total_steps")


def read_bytes(path: Path, cap: int) -> bytes:
    """A run file's bytes; FileNotFoundError if absent, Unreadable if it is not a regular file (a FIFO would block
    the page) or larger than `cap`."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path.name} is not a regular file")
        if st.st_size > cap:
            raise Unreadable(f"{path.name} holds {st.st_size} bytes; the dashboard reads at most {cap}")
        return fh.read(cap + 1)


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None if absent or unreadable (a run being written is not an error)."""
    try:
        data = json.loads(read_bytes(path, MAX_JSON_BYTES))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl -> records; a half-written last line (the run is writing it) is skipped. A file that is not
    a regular file, is larger than MAX_METRICS_BYTES or is not UTF-8 raises Unreadable naming it."""
    try:
        raw = read_bytes(path, MAX_METRICS_BYTES)
    except OSError:
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"{path.name} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _run_dirs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    found = {}
    if (root / METRICS).is_file():
        found[root.name] = root
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / METRICS).is_file():
            found.setdefault(d.name, d)
    return found


def load(path: Path, name: str) -> Run:
    updated = (path / METRICS).stat().st_mtime
    try:
        records = read_metrics(path / METRICS)
    except Unreadable as e:
        return Run(name, path, [], "unreadable", updated, str(e))
    if (path / DONE).exists():
        status = "done"
    elif time.time() - updated < RUNNING_WITHIN_S:
        status = "running"
    else:
        status = "stopped"
    return Run(name, path, records, status, updated)


def list_runs(root: Path | None) -> list[Run]:
    """Every run under `root`, the most recently updated first."""
    if root is None:
        return []
    runs = [load(p, n) for n, p in _run_dirs(root).items()]
    return sorted(runs, key=lambda r: -r.updated)


def find_run(root: Path | None, name: str) -> Run:
    dirs = _run_dirs(root) if root is not None else {}
    if name not in dirs:
        raise FileNotFoundError(f"no run named {name!r}")
    return load(dirs[name], name)


# ---------------------------------------------------------------- the chart (server-side SVG numbers)
def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round numbers covering [lo, hi] (whole numbers only with `integer`)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, math.ceil(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def chart(series: dict[str, list[tuple[float, float]]], log_y: bool = False) -> dict:
    """Lines as fractions of the plot area, for an SVG that stretches to any width: each line's points in
    0..1000 on both axes (y down), ticks as (fraction, label). With log_y the y axis is log10 (values <= 0
    are dropped)."""
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    pts = {k: [(x, fy(y)) for x, y in v if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
           for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    out = {"lines": [], "xticks": [], "yticks": [], "empty": not xs}
    if not xs:
        return out
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    if not log_y and 0 < y0 < 0.25 * y1:
        y0 = 0.0  # a curve that falls most of the way to zero reads best from zero
    y1 += 0.06 * (y1 - y0)  # headroom: the highest point stays clear of the top label
    fx_ = lambda x: (x - x0) / (x1 - x0)  # noqa: E731
    fy_ = lambda y: (y - y0) / (y1 - y0)  # noqa: E731
    for name, v in pts.items():
        xy = [(round(1000 * fx_(x), 1), round(1000 * (1 - fy_(y)), 1)) for x, y in v]
        out["lines"].append({"name": name, "n": len(v), "points": " ".join(f"{a},{b}" for a, b in xy),
                             "dots": xy if len(xy) <= 60 else []})
    out["xticks"] = [(fx_(t), f"{t:g}") for t in nice_ticks(x0, x1, integer=all(float(x).is_integer() for x in xs))
                     if x0 <= t <= x1]
    if log_y:
        yt = [t for t in range(math.floor(y0), math.ceil(y1) + 1) if y0 <= t <= y1] or [y0]
        out["yticks"] = [(fy_(t), f"{10 ** t:g}") for t in yt]
    else:
        out["yticks"] = [(fy_(t), f"{t:.4g}") for t in nice_ticks(y0, y1) if y0 <= t <= y1]
    return out


def loss_chart(run: Run, log_y: bool = False) -> dict:
    series = {"loss": [(r["step"], r["loss"]) for r in run.steps if "step" in r],
              "eval_loss": [(r["step"], r["eval_loss"]) for r in run.evals if "step" in r]}
    return chart(series, log_y=log_y)
