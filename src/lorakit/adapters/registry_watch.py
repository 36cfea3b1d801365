"""Following a shared registry's changes: LISTEN on the channel its writers NOTIFY (pg.CHANNEL),
on a connection of its own, in a daemon thread.

    w = reg.watch(callback)      # callback(payload) per committed change, callback(None) every tick
    w.info()                     # events seen, the last one and when
    w.stop()

PostgreSQL delivers a notification when its transaction commits, to every listening session, in commit
order, typically within milliseconds. A connection that drops loses what was sent meanwhile: the watcher
reconnects (every second until it can) and then calls callback({"op": "resync"}), so the follower compares
its state with the database instead of trusting the missed events. A callback that raises is logged; the
watcher goes on."""
from __future__ import annotations

import json
import logging
import threading
import time

from lorakit.adapters.pg import CHANNEL, RegistryUnavailable

log = logging.getLogger("lorakit.registry")


class Watcher:
    def __init__(self, reg, callback, tick_s: float = 1.0):
        self.reg, self.callback, self.tick_s, self.channel = reg, callback, tick_s, CHANNEL
        self.events, self.last, self.last_at, self.reconnects = 0, None, None, 0
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorakit-registry-watch", daemon=True)

    def start(self, wait_s: float = 10.0) -> "Watcher":
        """Start listening; returns once LISTEN is in place (so no change committed after start() is missed)."""
        self._thread.start()
        self._listening.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.tick_s + 5)

    def info(self) -> dict:
        return {"listening": self._listening.is_set(), "events": self.events, "last": self.last,
                "last_at": self.last_at, "reconnects": self.reconnects}

    def _call(self, payload) -> None:
        try:
            self.callback(payload)
        except Exception:  # noqa: BLE001 - a follower's failure must not stop the following
            log.exception("registry change handler failed on %s", payload)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.reg.db.connect()
                    conn.execute(f"LISTEN {self.channel}")
                    if self._listening.is_set():  # a reconnect: events may have been missed
                        self.reconnects += 1
                        log.warning("registry %s: listening again after a lost connection", self.reg.path)
                        self._call({"op": "resync"})
                    self._listening.set()
                got = False
                for n in conn.notifies(timeout=self.tick_s):
                    got = True
                    try:
                        payload = json.loads(n.payload)
                    except ValueError:
                        payload = {"op": "unknown", "raw": n.payload}
                    self.events += 1
                    self.last, self.last_at = payload, time.time()
                    log.info("registry change: %s", payload)
                    self._call(payload)
                    if self._stop.is_set():
                        break
                if not got:
                    self._call(None)
            except (RegistryUnavailable, OSError, self.reg.db.psycopg.Error) as e:
                log.warning("registry %s: watch connection lost (%s); reconnecting", self.reg.path, e)
                if conn is not None:
                    try:
                        conn.close()
                    except self.reg.db.psycopg.Error:
                        pass
                conn = None
                self._stop.wait(1.0)
        if conn is not None:
            conn.close()
