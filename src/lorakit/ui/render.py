"""Jinja2 templates (autoescape on: every name, prompt, path and answer is escaped) and the headers
every dashboard page carries (a Content-Security-Policy that allows only this origin's scripts and styles,
no framing, no sniffing)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

HERE = Path(__file__).parent
STATIC = HERE / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def fmt_num(v, digits: int = 4) -> str:
    """Numbers for people: ints with thousands separators, floats to `digits` significant digits."""
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 10 ** digits or (v == int(v) and abs(v) < 1e15):
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_bytes(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_time(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""


def fmt_json(v) -> str:
    return json.dumps(v, indent=2, sort_keys=True, default=str)


def static_version() -> str:
    """Changes when a static file changes, so browsers do not keep an old script."""
    return str(int(max((p.stat().st_mtime for p in STATIC.iterdir()), default=0)))


def make_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt_num, bytes=fmt_bytes, time=fmt_time, tojson_pretty=fmt_json)
    env.globals["static_v"] = static_version()
    return env


class Renderer:
    def __init__(self):
        self.env = make_env()

    def page(self, template: str, status: int = 200, **ctx) -> HTMLResponse:
        html = self.env.get_template(template).render(**ctx)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
