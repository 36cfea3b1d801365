"""Dashboard sessions: random server-side session ids in an HttpOnly, SameSite=Strict cookie, one CSRF
token per session, and the access level the key given at login earned.

A visitor gets an anonymous session (level ANON) the first time a page sets one (the login page), so
the login form itself carries a CSRF token. Logging in replaces the session with a new id (no session
fixation). Levels: ANON < USER (an inference key, or anyone when the server has no inference keys)
< ADMIN (the admin key). Sessions live in memory: a restart logs everyone out.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "lorakit_session"
ANON, USER, ADMIN = 0, 1, 2
LEVEL_NAMES = {ANON: "not logged in", USER: "user", ADMIN: "admin"}
MAX_FORM_BYTES = 64_000


@dataclass
class Session:
    sid: str
    csrf: str
    level: int
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) shown once by the next page


class Sessions:
    """In-memory session store with a time to live and a cap (the oldest sessions go first)."""

    def __init__(self, ttl_s: float = 8 * 3600, max_sessions: int = 10_000):
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request: Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        with self._lock:
            s = self._by_id.get(sid)
            if s is None:
                return None
            if s.expires < time.time():
                del self._by_id[sid]
                return None
            return s

    def new(self, level: int = ANON) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), level, time.time() + self.ttl_s)
        with self._lock:
            self._by_id[s.sid] = s
            while len(self._by_id) > self.max_sessions:
                self._by_id.popitem(last=False)
        return s

    def drop(self, s: Session | None) -> None:
        if s is not None:
            with self._lock:
                self._by_id.pop(s.sid, None)

    def __len__(self) -> int:
        return len(self._by_id)


def set_cookie(response: Response, request: Request, s: Session, ttl_s: float) -> None:
    response.set_cookie(COOKIE, s.sid, max_age=int(ttl_s), path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")


def key_level(key: str, api_keys: list[str], admin_key: str | None) -> int:
    """The level a key earns: ADMIN for the admin key, USER for an inference key, else ANON."""
    k = key.strip().encode()
    if not k:
        return ANON
    if admin_key and hmac.compare_digest(k, admin_key.encode()):
        return ADMIN
    if any(hmac.compare_digest(k, a.encode()) for a in api_keys):
        return USER
    return ANON


def level_of(s: Session | None, api_keys: list[str]) -> int:
    """A session's effective level: without inference keys the dashboard is open to read (like the API)."""
    level = s.level if s else ANON
    return max(level, USER) if not api_keys else level


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another host (Origin or Referer header)."""
    src = request.headers.get("origin")
    if src == "null":
        return False
    src = src or request.headers.get("referer")
    if not src:
        return True  # neither header: not a browser's cross-site POST (those send Origin); the token decides
    # the host only: behind a TLS-terminating proxy the scheme seen here may be http while the page's is https
    return urlsplit(src).netloc == request.headers.get("host", request.url.netloc)


def csrf_ok(s: Session | None, token: str | None, request: Request) -> bool:
    if s is None or not token or not same_origin(request):
        return False
    return hmac.compare_digest(token.encode(), s.csrf.encode())


async def read_form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body -> {field: last value}; ValueError if too big or not a form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise ValueError(f"expected a form (application/x-www-form-urlencoded), got {ctype or 'no content type'!r}")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > MAX_FORM_BYTES:
            raise ValueError(f"form body exceeds {MAX_FORM_BYTES} bytes")
        chunks.append(c)
    try:
        text = b"".join(chunks).decode()
    except UnicodeDecodeError:
        raise ValueError("form body is not UTF-8") from None
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def safe_next(path: str | None) -> str:
    """Only a local dashboard path may be a redirect target after login (no open redirect)."""
    if path and path.startswith("/ui/") and not path.startswith("//") and "\\" not in path \
            and all(32 < ord(c) < 127 for c in path):
        return path
    return "/ui/adapters"


class LoginThrottle:
    """Failed dashboard logins per client and in all, over a sliding window: past `per_client` failures from one
    address, or `overall` from everyone, within `window_s` seconds, a login is refused before its key is looked at
    (HTTP 429), so neither one client nor many in parallel can try more than that many keys a window."""

    def __init__(self, per_client: int = 5, overall: int = 20, window_s: float = 60.0, max_clients: int = 10_000):
        self.per_client, self.overall, self.window_s, self.max_clients = per_client, overall, window_s, max_clients
        self._all: deque[float] = deque()
        self._by: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _trim(self, q: deque, now: float) -> deque:
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def wait_s(self, client: str) -> float:
        """0 if `client` may try a key now, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            waits = [q[0] + self.window_s - now for q, cap in
                     ((self._trim(self._all, now), self.overall),
                      (self._trim(self._by.get(client, deque()), now), self.per_client)) if len(q) >= cap]
        return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._all.append(now)
            q = self._by.pop(client, None) or deque()
            self._by[client] = self._trim(q, now)  # most recent last
            q.append(now)
            while len(self._by) > self.max_clients:
                self._by.popitem(last=False)
