"""The dashboard's shared state: options, the UI object (sessions, rendering, access checks)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from lorakit.ui.render import Renderer
from lorakit.ui.session import ADMIN, ANON, LEVEL_NAMES, USER, Session, Sessions, clear_cookie, \
    csrf_ok, level_of, read_form, set_cookie

__all__ = ["UI", "UIOptions", "UIState"]


@dataclass
class UIOptions:
    runs_dir: Path | None = None
    sweeps_dir: Path | None = None
    session_ttl_s: float = 8 * 3600


@dataclass
class UIState:
    """What `lorakit ui` has without a model: the registry and the keys (no engine: Compare is off)."""
    registry: object
    api_keys: list[str]
    admin_key: str | None
    base_name: str
    engine: object = None


class UI:
    """Shared by the route modules: the state, sessions, templates, and the checks every page makes."""

    def __init__(self, state, options: UIOptions):
        self.state, self.options = state, options
        self.sessions = Sessions(options.session_ttl_s)
        self.renderer = Renderer()

    @property
    def has_inference(self) -> bool:
        return getattr(self.state, "engine", None) is not None

    @property
    def registry(self):
        return getattr(self.state, "registry", None)

    def level(self, s: Session | None) -> int:
        return level_of(s, list(self.state.api_keys))

    def page(self, request: Request, s: Session | None, template: str, status: int = 200, **ctx) -> Response:
        """Render a page; a visitor without a session gets one (so its forms carry a CSRF token)."""
        new = s is None
        if new:
            s = self.sessions.new(ANON)
        flash, s.flash = s.flash, []
        level = self.level(s)
        resp = self.renderer.page(template, status, request_path=request.url.path, csrf=s.csrf, level=level,
                                  level_name=LEVEL_NAMES[level], flash=flash, base_name=self.state.base_name,
                                  admin_enabled=bool(self.state.admin_key), logged_in=s.level > ANON,
                                  open_access=not self.state.api_keys, ADMIN=ADMIN, USER=USER, **ctx)
        if new:
            set_cookie(resp, request, s, self.options.session_ttl_s)
        return resp

    def error(self, request: Request, s: Session | None, status: int, message: str) -> Response:
        return self.page(request, s, "error.html", status=status, status_code=status, message=message)

    def gate(self, request: Request, need: int = USER) -> tuple[Session | None, Response | None]:
        """For GET pages: (session, None) if allowed, else (session, a redirect to login or a 403 page)."""
        s = self.sessions.get(request)
        if self.level(s) >= need:
            return s, None
        if self.level(s) < USER:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return s, RedirectResponse(f"/ui/login?next={_quote(nxt)}", status_code=303)
        return s, self.error(request, s, 403, "This page needs the admin key: log in with it on the login page.")

    async def post_gate(self, request: Request, need: int) -> tuple[Session | None, dict, Response | None]:
        """For form POSTs: the form, after checking its CSRF token and the session's level."""
        s = self.sessions.get(request)
        try:
            form = await read_form(request)
        except ValueError as e:
            return s, {}, self.error(request, s, 400, str(e))
        if not csrf_ok(s, form.get("csrf"), request):
            return s, form, self.error(request, s, 403, "The form's CSRF token is missing or invalid "
                                                        "(an old page, or a request from another site). Reload and retry.")
        if self.level(s) < need:
            msg = "This action needs the admin key." if need == ADMIN else "Log in first."
            return s, form, self.error(request, s, 403 if self.level(s) >= USER else 401, msg)
        return s, form, None

    def logout(self, request: Request, s: Session | None) -> Response:
        self.sessions.drop(s)
        resp = RedirectResponse("/ui/login", status_code=303)
        clear_cookie(resp, request)
        return resp


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="/")
