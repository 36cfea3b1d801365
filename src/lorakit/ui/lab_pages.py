"""Dashboard routes for what is on disk: training runs (--runs-dir) and sweeps (--sweeps-dir)."""
from __future__ import annotations

from urllib.parse import quote

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import FileResponse

from lorakit.ui import markdown, runs as R, sweeps as S
from lorakit.ui.core import UI
from lorakit.ui.render import SECURITY_HEADERS


def add_routes(app, ui: UI) -> None:
    runs_dir, sweeps_dir = ui.options.runs_dir, ui.options.sweeps_dir

    # ------------------------------------------------------------ runs
    @app.get("/ui/runs", include_in_schema=False)
    async def runs(request: Request, s=Depends(ui.viewer)):
        rows = [run_summary(r) for r in R.list_runs(runs_dir)]
        return ui.page(request, s, "runs.html", nav="runs", rows=rows, runs_dir=str(runs_dir) if runs_dir else None)

    @app.get("/ui/runs/{name}", include_in_schema=False)
    async def run(name: str, request: Request, s=Depends(ui.viewer)):
        r = ui.find(request, s, R.find_run, runs_dir, name)
        log_y = request.query_params.get("scale") == "log"
        ev = R.read_json(r.path / R.EVAL)
        return ui.page(request, s, "run.html", nav="runs", run=run_summary(r), chart=R.loss_chart(r, log_y),
                       log_y=log_y, config=r.config(), adapter_config=R.read_json(r.path / R.ADAPTER_CONFIG),
                       done=R.read_json(r.path / R.DONE), eval=eval_view(ev),
                       chart_src=f"/ui/runs/{quote(name, safe='')}/chart" + ("?scale=log" if log_y else ""))

    @app.get("/ui/runs/{name}/chart", include_in_schema=False)
    async def run_chart(name: str, request: Request, s=Depends(ui.viewer)):
        """The live part of a run's page (numbers and the curve), fetched again while the run is going."""
        r = ui.find(request, s, R.find_run, runs_dir, name)
        resp = ui.renderer.page("chart.html", run=run_summary(r),
                                chart=R.loss_chart(r, request.query_params.get("scale") == "log"))
        resp.headers["X-Run-Status"] = r.status
        return resp

    # ------------------------------------------------------------ sweeps
    @app.get("/ui/sweeps", include_in_schema=False)
    async def sweeps(request: Request, s=Depends(ui.viewer)):
        rows = [S.summary(n, p) for n, p in S.sweep_dirs(sweeps_dir).items()]
        return ui.page(request, s, "sweeps.html", nav="sweeps", rows=rows,
                       sweeps_dir=str(sweeps_dir) if sweeps_dir else None)

    @app.get("/ui/sweeps/{name}", include_in_schema=False)
    async def sweep(name: str, request: Request, s=Depends(ui.viewer)):
        d = ui.find(request, s, S.find_sweep, sweeps_dir, name)
        plots = S.plots(d)
        shown: set[str] = set()

        def image_url(src: str) -> str | None:
            if src in plots:
                shown.add(src)
                return f"/ui/sweeps/{quote(name, safe='')}/plots/{quote(src, safe='')}"
            return None

        text = S.read_report(d)
        report = markdown.render(text, image_url) if text else None
        header, rows = S.read_results(d)
        extra = [(p, f"/ui/sweeps/{quote(name, safe='')}/plots/{quote(p, safe='')}") for p in plots if p not in shown]
        return ui.page(request, s, "sweep.html", nav="sweeps", name=name, report=report, header=header, rows=rows,
                       extra_plots=extra)

    @app.get("/ui/sweeps/{name}/plots/{plot}", include_in_schema=False)
    async def sweep_plot(name: str, plot: str, request: Request, s=Depends(ui.viewer)):
        path = ui.find(request, s, lambda: S.plot_path(S.find_sweep(sweeps_dir, name), plot))
        return FileResponse(path, media_type="image/png", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=60"})


def run_summary(r: R.Run) -> dict:
    steps = r.steps
    total = r.total_steps()
    last = steps[-1] if steps else {}
    return {"name": r.name, "path": str(r.path), "status": r.status, "problem": r.problem, "updated": r.updated,
            "step": last.get("step", 0), "total_steps": total,
            "progress": (last.get("step", 0) / total) if total else None,
            "loss": last.get("loss"), "first_loss": steps[0].get("loss") if steps else None,
            "eval_loss": r.last("eval_loss"), "tokens_per_s": last.get("tokens_per_s"),
            "seconds": last.get("seconds"), "tokens": last.get("tokens"), "n_evals": len(r.evals),
            "lr": last.get("lr")}


def eval_view(ev: dict | None) -> dict | None:
    """eval.json (`lorakit train --compare` / `lorakit eval`): before/after metrics side by side."""
    if not ev:
        return None
    before, after = ev.get("before") or {}, ev.get("after") or {}
    keys = [k for k in ("loss", "ppl", "accuracy") if k in before or k in after]
    keys += [k for k in {**before, **after} if k not in keys]
    examples = ev.get("examples") if isinstance(ev.get("examples"), list) else []
    return {"n": ev.get("n"), "rows": [(k, before.get(k), after.get(k)) for k in keys],
            "changed": ev.get("answers_changed"), "kl": ev.get("kl_to_base"),
            "examples": [e for e in examples if isinstance(e, dict)][:20]}
