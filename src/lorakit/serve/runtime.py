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



class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks). `url` is set once it listens."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
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
