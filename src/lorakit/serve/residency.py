"""The engine's adapters: which are resident in the slot bank, which are being read from disk, and their labels.

A request's adapter files are read and checked on a loader thread as soon as it is submitted (`prefetch`:
the file's checks and split, `SlotBank.prepare`), so the engine thread never waits on a disk or a check while
others decode; a request is admitted once every file it needs is read or
resident (`files_ready`), and `acquire` then pins its adapters (and its mixture's gates) in the bank for as long
as it runs. `release` unpins them. The engine's lock (a threading.Condition) guards the prefetch table, and the
engine is woken whenever a read finishes.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from lorakit.adapters.peft_files import AdapterFile
from lorakit.serve.request import AdapterUse, GenRequest, ScoreRequest
from lorakit.serve.slots import SlotBank


class AdapterLoadError(ValueError):
    """An adapter or mixture file of one request could not be loaded; the message says which."""


class Residency:
    def __init__(self, bank: SlotBank, lock: threading.Condition, wake: Callable[[], None]):
        self.bank, self._lock, self._wake = bank, lock, wake
        self.labels: dict[str, str] = {}  # adapter or mixture key -> "name@version"
        self._prefetch: dict[str, Future] = {}  # adapter key -> AdapterFile being read from disk
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-adapter-load")
        self.loads = 0  # adapters written into a slot

    def note(self, req: GenRequest | ScoreRequest) -> None:
        """Remember req's labels and start reading its adapters (holds the lock)."""
        for a in req.adapters:
            self.labels[a.key] = a.label or a.key
            self.prefetch(a)
        if req.mixture is not None:
            self.labels[req.mixture.key] = req.mixture.label or req.mixture.key

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def prefetch(self, a: AdapterUse) -> None:
        """Start reading adapter `a` from disk on the loader thread unless resident or under way (holds the lock)."""
        if a.key in self.bank.resident or a.key in self._prefetch:
            return
        fut = self._loader.submit(lambda: self.bank.prepare(a.load()))  # read and checked off the engine thread
        self._prefetch[a.key] = fut
        fut.add_done_callback(lambda _: self._wake())

    def files_ready(self, req: GenRequest | ScoreRequest) -> bool:
        """All of req's adapters are resident or read from disk (holds the lock). Starts reads still missing."""
        ready = True
        for a in req.adapters:
            if a.key in self.bank.resident:
                continue
            self.prefetch(a)  # e.g. evicted since the request was submitted
            ready = ready and self._prefetch[a.key].done()
        return ready

    def _file(self, key: str, load: Callable[[], AdapterFile]) -> Callable[[], dict]:
        def get():
            with self._lock:
                fut = self._prefetch.pop(key, None)
            return fut.result() if fut is not None else self.bank.prepare(load())
        return get

    def acquire(self, req: GenRequest | ScoreRequest) -> tuple[list[int], str | None]:
        """Pin req's adapters in slots (and its mixture's gates): (slots, mixture key or None). A broken adapter or
        mixture file raises AdapterLoadError and leaves nothing pinned."""
        slots: list[int] = []
        mix = None
        try:
            for a in req.adapters:
                loaded = a.key in self.bank.resident
                slots.append(self.bank.acquire(a.key, self._file(a.key, a.load)))
                self.loads += not loaded
            if req.mixture is not None:
                self.bank.acquire_mixture(req.mixture.key, req.mixture.load)
                mix = req.mixture.key
        except Exception as e:  # noqa: BLE001 - a broken adapter or mixture file fails this request only
            self.release(slots, mix)
            what = "mixture" if len(slots) == len(req.adapters) and req.mixture else "adapter"
            raise AdapterLoadError(f"{what} could not be loaded: {e}") from e
        return slots, mix

    def release(self, slots: list[int], mixture: str | None) -> None:
        for s in slots:
            self.bank.release(s)
        if mixture is not None:
            self.bank.release_mixture(mixture)

    def unload(self, keys: list[str]) -> list[str]:
        """Drop the resident adapters `keys` that no running request uses (engine thread); -> their labels."""
        return [self.label(k) for k in keys if self.bank.unload(k)]

    def info(self) -> dict:
        return {"resident": [self.label(k) for k in self.bank.resident],
                "resident_mixtures": [self.label(k) for k in self.bank.mixtures],
                "max_slots": self.bank.max_slots, "slot_bytes": self.bank.nbytes()}

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
