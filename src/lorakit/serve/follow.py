"""A replica follows a shared registry: when any server (or `lorakit adapters`) adds, rolls back or removes a
version, PostgreSQL notifies every replica (adapters/registry_watch.py), and this one drops the memory slots
(and mixture gates) whose content hash no version uses any more.

What a request runs is resolved in the database when it arrives (serve/resolve.py), so a new version or a
rollback is served from the next request on, and a removed version is never given to a request that arrives
after the removal committed. Following adds the memory side: a removed version's weights leave the slots at
once instead of waiting to be evicted. A slot that a running request holds, or that a queued request
(resolved before the removal) waits for, is dropped after them: the follower checks again every tick (1 s)
until none is left."""
from __future__ import annotations

import logging

log = logging.getLogger("lorakit.serve")


class Follower:
    def __init__(self, engine, registry):
        self.engine, self.registry = engine, registry
        self.pending: set[str] = set()  # dead keys still resident (in use when last tried)
        self.dropped = 0
        self.watcher = None

    def start(self) -> "Follower":
        self.watcher = self.registry.watch(self.on_change)
        return self

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

    def info(self) -> dict:
        return {**(self.watcher.info() if self.watcher else {}), "slots_dropped": self.dropped,
                "drop_pending": len(self.pending)}

    def on_change(self, event) -> None:
        if event is None and not self.pending:
            return  # an idle tick with nothing left to drop
        eng = self.engine
        keys = eng.call(lambda: list(eng.bank.resident) + list(eng.bank.mixtures)).result(timeout=60)
        dead = set(keys) - self.registry.live_shas(keys) if keys else set()
        if not dead:
            self.pending.clear()
            return
        unloaded, self.pending = eng.call(lambda: _drop(eng, dead)).result(timeout=60)
        self.dropped += len(unloaded)
        if unloaded:
            log.info("dropped from memory (no version uses them any more): %s", ", ".join(unloaded))


def _drop(eng, dead: set[str]) -> tuple[list[str], set[str]]:
    """On the engine thread: unload the `dead` keys that no running request holds and no queued one waits for
    (those were resolved before the removal and are served as they were resolved); -> (labels unloaded, keys
    still resident)."""
    queued = eng.queued()
    wanted = {a.key for r in queued for a in r.adapters} | {r.mixture.key for r in queued if r.mixture is not None}
    unloaded = eng.residency.unload(sorted(dead - wanted))
    return unloaded, {k for k in dead if k in eng.bank.resident or k in eng.bank.mixtures}


def follow(engine, registry) -> Follower | None:
    """Start following `registry` if it is a shared one (it has `watch`); None for the SQLite registry."""
    if not hasattr(registry, "watch"):
        return None
    return Follower(engine, registry).start()
