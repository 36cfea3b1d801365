"""The dashboard's shared state: options, the UI object (sessions, rendering, access checks)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from lorakit.ui.render import Renderer
from lorakit.ui.session import ADMIN, ANON, LEVEL_NAMES, USER, Session, Sessions, LoginThrottle, clear_cookie, \
    csrf_ok, level_of, read_form, set_cookie

__all__ = ["UI", "UIOptions", "UIState", "Denied"]


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


class Denied(Exception):
    """A request the dashboard answers with a page of its own instead of the route's (the login redirect, a 404):
    `response` is what the visitor gets; mount() installs the one handler that sends it."""

    def __init__(self, response: Response):
        super().__init__("denied")
        self.response = response


class UI:
    """Shared by the route modules: the state, sessions, templates, and the checks every page makes."""

    def __init__(self, state, options: UIOptions):
        self.state, self.options = state, options
        self.sessions = Sessions(options.session_ttl_s)
        self.throttle = LoginThrottle()  # failed logins per client and in all
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

    def viewer(self, request: Request) -> Session | None:
        """The login gate of every page, as one FastAPI dependency (`s=Depends(ui.viewer)`): the visitor's session
        if it may see the pages, else `Denied` with a redirect to the login page (and back here afterwards)."""
        s = self.sessions.get(request)
        if self.level(s) < USER:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise Denied(RedirectResponse(f"/ui/login?next={_quote(nxt)}", status_code=303))
        return s

    def find(self, request: Request, s: Session | None, lookup, *args, missing=(FileNotFoundError,)):
        """`lookup(*args)` (a run, a sweep, a plot, an adapter by name), or `Denied` with the 404 page naming what is
        missing: every page's "not found" comes from here."""
        try:
            return lookup(*args)
        except missing as e:
            raise Denied(self.error(request, s, 404, str(e))) from None

    async def post_gate(self, request: Request, need: int) -> tuple[Session | None, dict]:
        """For form POSTs: (session, form) after checking the form's CSRF token and the session's level, else
        `Denied` with the error page."""
        s = self.sessions.get(request)
        try:
            form = await read_form(request)
        except ValueError as e:
            raise Denied(self.error(request, s, 400, str(e))) from None
        if not csrf_ok(s, form.get("csrf"), request):
            raise Denied(self.error(request, s, 403, "The form's CSRF token is missing or invalid (an old page, "
                                                     "or a request from another site). Reload and retry."))
        if self.level(s) < need:
            msg = "This action needs the admin key." if need == ADMIN else "Log in first."
            raise Denied(self.error(request, s, 403 if self.level(s) >= USER else 401, msg))
        return s, form

    def logout(self, request: Request, s: Session | None) -> Response:
        self.sessions.drop(s)
        resp = RedirectResponse("/ui/login", status_code=303)
        clear_cookie(resp, request)
        return resp


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="/")
