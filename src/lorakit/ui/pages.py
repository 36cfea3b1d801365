"""Dashboard routes: login, static files, the adapter registry (rollback/remove for admins) and Compare."""
from __future__ import annotations

import asyncio
import json
import logging
import math

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse

from lorakit.ui.core import UI, Denied
from lorakit.ui.session import ADMIN, ANON, USER, set_cookie
from lorakit.ui.forward import ForwardResponse
from lorakit.ui.render import SECURITY_HEADERS, STATIC
from lorakit.ui.session import csrf_ok, key_level, safe_next

log = logging.getLogger("lorakit.ui")
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
MAX_COMPARE_BODY = 64_000


def add_routes(app, ui: UI) -> None:
    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/adapters", status_code=303)

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/adapters", status_code=303)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in STATIC_TYPES}
        if name not in files:
            return JSONResponse({"error": {"message": f"no static file {name!r}"}}, status_code=404)
        return FileResponse(files[name], media_type=STATIC_TYPES[files[name].suffix],
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------ login
    @app.get("/ui/login", include_in_schema=False)
    async def login_page(request: Request):
        s = ui.sessions.get(request)
        return ui.page(request, s, "login.html", next=safe_next(request.query_params.get("next")), error=None)

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request):
        s, form = await ui.post_gate(request, ANON)
        nxt = safe_next(form.get("next"))
        client = request.client.host if request.client else "?"
        wait = ui.throttle.wait_s(client)
        if wait:  # too many failures from here or from everyone: no key is even looked at
            resp = ui.page(request, s, "login.html", status=429, next=nxt,
                           error=f"Too many failed logins; try again in {wait:.0f} s.")
            resp.headers["Retry-After"] = str(max(1, round(wait)))
            return resp
        level = key_level(form.get("key", ""), list(ui.state.api_keys), ui.state.admin_key)
        if level == ANON:
            ui.throttle.failed(client)
            await asyncio.sleep(0.5)  # slows guessing
            log.warning("dashboard login refused from %s", client)
            return ui.page(request, s, "login.html", status=401, next=nxt,
                           error="Wrong key: enter an inference key or the admin key this server was started with.")
        ui.sessions.drop(s)  # a new id on every login: no session fixation
        new = ui.sessions.new(level)
        new.flash.append(("ok", "Logged in as admin." if level == ADMIN else "Logged in."))
        resp = RedirectResponse(nxt, status_code=303)
        set_cookie(resp, request, new, ui.options.session_ttl_s)
        return resp

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request):
        s, _ = await ui.post_gate(request, ANON)
        return ui.logout(request, s)

    # ------------------------------------------------------------ adapters
    def describe(name: str) -> dict:
        if ui.registry is None:
            raise FileNotFoundError("no registry")
        return ui.registry.describe(name)  # ValueError: no such adapter

    @app.get("/ui/adapters", include_in_schema=False)
    async def adapters(request: Request, s=Depends(ui.viewer)):
        reg = ui.registry
        rows = [adapter_row(reg, v) for v in reg.list()] if reg is not None else []
        return ui.page(request, s, "adapters.html", nav="adapters", rows=rows, registry=reg_info(reg))

    @app.get("/ui/adapters/{name}", include_in_schema=False)
    async def adapter(name: str, request: Request, s=Depends(ui.viewer)):
        info = ui.find(request, s, describe, name, missing=(FileNotFoundError, ValueError))
        for v in info["versions"]:
            v["size"] = _size(v["path"])
        return ui.page(request, s, "adapter.html", nav="adapters", a=info, registry=reg_info(ui.registry))

    @app.post("/ui/adapters/{name}/rollback", include_in_schema=False)
    async def rollback(name: str, request: Request):
        s, form = await ui.post_gate(request, ADMIN)
        try:
            to = int(form["version"]) if form.get("version") else None
            v = ui.registry.rollback(name, to)
            s.flash.append(("ok", f"{v.name}: version {v.version} is now current."))
        except ValueError as e:
            s.flash.append(("error", str(e)))
        return RedirectResponse(f"/ui/adapters/{_q(name)}", status_code=303)

    @app.post("/ui/adapters/{name}/remove", include_in_schema=False)
    async def remove(name: str, request: Request):
        s, form = await ui.post_gate(request, ADMIN)
        ref = f"{name}@{form['version']}" if form.get("version") else name
        try:
            gone = ui.registry.remove(ref)
        except ValueError as e:
            s.flash.append(("error", str(e)))
            return RedirectResponse(f"/ui/adapters/{_q(name)}", status_code=303)
        engine = getattr(ui.state, "engine", None)
        if engine is not None:  # slots are keyed by content hash, as the admin API's remove unloads them
            await asyncio.wrap_future(engine.unload([v.sha256 for v in gone]))
        s.flash.append(("ok", "Removed " + ", ".join(f"{v.name}@{v.version}" for v in gone) + "."))
        left = ui.registry.versions(name)
        return RedirectResponse(f"/ui/adapters/{_q(name)}" if left else "/ui/adapters", status_code=303)

    # ------------------------------------------------------------ compare
    @app.get("/ui/compare", include_in_schema=False)
    async def compare(request: Request, s=Depends(ui.viewer)):
        reg = ui.registry
        choices = []
        if reg is not None:
            for v in reg.list():
                choices.append({"id": v.name, "label": f"{v.name} (current: v{v.version})"})
                choices += [{"id": f"{o.name}@{o.version}", "label": f"{o.name}@{o.version}"}
                            for o in reg.versions(v.name)]
        pre = {m for m in request.query_params.getlist("models") for m in m.split(",")}
        return ui.page(request, s, "compare.html", nav="compare", choices=choices, preselect=pre,
                       has_inference=ui.has_inference, max_new_tokens=_limit(ui.state))

    async def compare_request(request: Request) -> dict:
        """A Compare call's JSON body {model, prompt, ...} after the session, CSRF and size checks (else `Denied`
        with a JSON error)."""
        s = ui.sessions.get(request)
        if not csrf_ok(s, request.headers.get("x-csrf-token"), request):
            raise Denied(_json_error(403, "missing or invalid CSRF token (reload the page)"))
        if ui.level(s) < USER:
            raise Denied(_json_error(401, "log in first"))
        if not ui.has_inference:
            raise Denied(_json_error(503, "this dashboard runs without a model (lorakit ui): start `lorakit serve`"))
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_COMPARE_BODY:
                raise Denied(_json_error(413, f"request exceeds {MAX_COMPARE_BODY} bytes"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                    or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
                raise ValueError("'model' and 'prompt' must be non-empty strings")
        except ValueError as e:
            raise Denied(_json_error(400, f"bad compare request: {e}")) from None
        return body

    def forward(request: Request, path: str, body: dict) -> ForwardResponse:
        keys = list(ui.state.api_keys)  # the session's login earned the key: the API call carries it
        return ForwardResponse(request.app, "POST", path, body, keys[0] if keys else None)

    @app.post("/ui/api/complete", include_in_schema=False)
    async def complete(request: Request):
        body = await compare_request(request)
        max_tokens = body.get("max_tokens", 64)  # JSON's Infinity and 1e400 parse as float inf
        if isinstance(max_tokens, float) and math.isfinite(max_tokens) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            return _json_error(400, f"bad compare request: 'max_tokens' must be a whole number, got {max_tokens!r}")
        return forward(request, "/v1/chat/completions", {
            "model": body["model"], "messages": [{"role": "user", "content": body["prompt"]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}})

    @app.post("/ui/api/score", include_in_schema=False)
    async def score(request: Request):
        """Per-token KL to the base of an answer Compare streamed: /v1/score on the same prompt and tokens."""
        body = await compare_request(request)
        return forward(request, "/v1/score", {"model": body["model"], "completion": body.get("token_ids"),
                                              "messages": [{"role": "user", "content": body["prompt"]}]})


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=SECURITY_HEADERS)


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def _limit(state) -> int:
    limits = getattr(state, "limits", None)
    return int(getattr(limits, "max_new_tokens", 0) or 256)


def _size(path) -> int | None:
    from pathlib import Path

    try:
        return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    except OSError:
        return None


def reg_info(reg) -> dict:
    if reg is None:
        return {"path": None, "base_name": None, "fp": None}
    fp = reg.base_fp or {}
    return {"path": str(reg.path), "base_name": reg.base_name,
            "fp": {k: v for k, v in fp.items() if k != "shapes"} if fp else None}


def adapter_row(reg, v) -> dict:
    """One registry line: the current version plus how many versions exist and the adapter's description."""
    d = v.to_json()
    try:
        desc = reg.describe(v.name)
        d["n_versions"], d["description"] = len(desc["versions"]), desc["description"]
    except ValueError:
        d["n_versions"], d["description"] = 1, ""
    d["size"] = _size(v.path)
    d["last_eval"] = v.evals[-1]["metrics"] if v.evals else None
    return d
