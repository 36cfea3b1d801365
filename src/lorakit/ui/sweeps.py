"""Sweep directories, as `lorakit sweep` leaves them: report.md, results.csv, *.png plots, runs/.
A sweep is the directory given (if it is one) or one of its direct subdirectories, looked up by name in
that listing; a plot is served only if it is a .png file listed in that sweep directory and resolves
inside it (no path from the request is ever joined onto the disk path)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

REPORT, RESULTS = "report.md", "results.csv"
MAX_REPORT_BYTES = 2_000_000


def _is_sweep(d: Path) -> bool:
    return (d / REPORT).is_file() or (d / RESULTS).is_file()


def sweep_dirs(root: Path | None) -> dict[str, Path]:
    if root is None or not root.is_dir():
        return {}
    found = {}
    if _is_sweep(root):
        found[root.name] = root
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and _is_sweep(d):
            found.setdefault(d.name, d)
    return found


def find_sweep(root: Path | None, name: str) -> Path:
    dirs = sweep_dirs(root)
    if name not in dirs:
        raise FileNotFoundError(f"no sweep named {name!r}")
    return dirs[name]


def plots(sweep: Path) -> list[str]:
    """Names of the .png files directly in the sweep directory (and inside it once resolved)."""
    root = sweep.resolve()
    out = []
    for p in sorted(sweep.iterdir()):
        if p.suffix.lower() == ".png" and p.is_file() and p.resolve().parent == root:
            out.append(p.name)
    return out


def plot_path(sweep: Path, name: str) -> Path:
    if name not in plots(sweep):
        raise FileNotFoundError(f"no plot named {name!r} in this sweep")
    return sweep / name


def read_report(sweep: Path) -> str | None:
    p = sweep / REPORT
    if not p.is_file():
        return None
    with open(p, "rb") as f:
        return f.read(MAX_REPORT_BYTES).decode("utf-8", errors="replace")


def read_results(sweep: Path) -> tuple[list[str], list[list]]:
    """results.csv -> (header, rows), numbers as int/float so the page can format them."""
    p = sweep / RESULTS
    if not p.is_file():
        return [], []
    rows = list(csv.reader(io.StringIO(p.read_text(errors="replace"))))
    if not rows:
        return [], []

    def cell(s: str):
        for t in (int, float):
            try:
                return t(s)
            except ValueError:
                pass
        return s

    return rows[0], [[cell(c) for c in r] for r in rows[1:]]


def summary(name: str, sweep: Path) -> dict:
    header, rows = read_results(sweep)
    title = ""
    report = read_report(sweep)
    if report:
        title = next((ln.lstrip("#").strip() for ln in report.splitlines() if ln.startswith("#")), "")
    return {"name": name, "title": title, "runs": len(rows), "plots": len(plots(sweep)),
            "updated": max((p.stat().st_mtime for p in sweep.iterdir()), default=0)}
