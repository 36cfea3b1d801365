"""Call the server's own HTTP API in-process: the dashboard's Compare page streams answers from the very
same /v1/chat/completions route (same parsing, limits, engine and server-sent events) an API client uses.
The browser holds only its session cookie; the key that the session earned is added here."""
from __future__ import annotations

import json

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DROP_HEADERS = {b"authorization", b"cookie", b"content-length", b"content-type", b"x-csrf-token"}


class ForwardResponse(Response):
    """An ASGI response that runs `app` on a rewritten request and passes its response through as it comes."""

    def __init__(self, app, method: str, path: str, body: dict, bearer: str | None):
        self.app, self.method, self.path, self.bearer = app, method, path, bearer
        self.raw = json.dumps(body).encode()
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = False

        async def recv():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            return await receive()  # http.disconnect when the browser goes away: the API cancels the request

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROP_HEADERS]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(self.raw)).encode())]
        if self.bearer:
            headers.append((b"authorization", b"Bearer " + self.bearer.encode()))
        inner = {k: v for k, v in scope.items() if k in ("type", "http_version", "scheme", "server", "client",
                                                         "root_path", "state", "extensions", "asgi")}
        inner.update(method=self.method, path=self.path, raw_path=self.path.encode(), query_string=b"",
                     headers=headers)
        await self.app(inner, recv, send)
