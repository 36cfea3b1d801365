"""Running the server process: how many CPU threads torch gets, and uvicorn in a background thread."""
from __future__ import annotations

import threading
import time

from lorakit.models import usable_cores


def cpu_threads(requested: int = 0) -> int:
    """Torch CPU threads for the server: `requested` if > 0, else 1 where at most 4 cores are usable and
    half of them (at most 16) above that. The decode step of a small batch gains little from more
    threads, and threads that spin-wait fight the HTTP loop, the adapter loader and other programs:
    on a busy 2-core machine 2 threads served 9x slower than 1."""
    if requested < 0:
        raise ValueError(f"--threads must be 0 (automatic) or positive, got {requested}")
    if requested:
        return requested
    cores = usable_cores()
    return 1 if cores <= 4 else min(cores // 2, 16)



HEADER_TIMEOUT_S = 10.0  # a connection must send a whole request head within this (slowloris)
BODY_TIMEOUT_S = 30.0  # and its body within this (serve/app.py read_body)


def timed_protocol():
    """uvicorn's h11 protocol with a deadline for every request head: from the moment a connection waits for a
    request (opened, or its last response sent) it has `header_timeout` seconds to send the whole head, however
    slowly the bytes trickle in (uvicorn's own keep-alive timer restarts on every byte, so 200 slow clients
    holding connections open were never closed)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def __init__(self, config, *a, **kw):
            super().__init__(config, *a, **kw)
            self.header_timeout = getattr(config, "header_timeout", HEADER_TIMEOUT_S)
            self._head_timer = None

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

        def _head_late(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def uvicorn_config(app, host: str, port: int, log_level: str = "info", header_timeout: float = HEADER_TIMEOUT_S,
                   **kw):
    """The uvicorn Config the server runs under: request heads within `header_timeout` (timed_protocol), idle
    keep-alive connections closed after 5 s."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=timed_protocol(),
                            timeout_keep_alive=5, **kw)
    config.header_timeout = header_timeout
    return config


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks). `url` is set once it listens."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout: float = HEADER_TIMEOUT_S):
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level, header_timeout,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="lorakit-http", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
