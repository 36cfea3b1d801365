"""The serving engine: one background thread owns the model and runs continuous batching.

Each turn of the loop
  1. runs queued commands (e.g. unload an adapter),
  2. admits waiting requests into free rows: their adapters are made resident in memory slots
     (LRU; the files are read from disk by a loader thread while others decode) and their
     prompts prefilled together,
  3. runs ONE decode step for every running row together, whatever adapter (or stack) each row
     uses: the per-row slot index goes to `lorakit.kernels.lora_delta` through LoraLinear.routing
     (a row that runs a mixture of LoRAs gets per-token coefficients from its router's gates, slots.py),
  4. streams each row's new token to its request and retires finished rows.

A request that arrives while others decode joins at the next turn. Results leave through each
request's `sink(event)`, called on the engine thread: ("token", id), ("done", reason) with reason
"stop" | "length" | "cancelled", or ("error", message). A ScoreRequest (score.py: per-token KL to the base)
waits for its adapters likewise and runs between steps on this thread: its routing never races with a step.

Isolation: one request's numbers never reach another row. A row's KV cache is zeroed when a new
request takes it; a request whose adapter cannot be loaded, whose prefill or decode raises, or whose
logits are not finite (NaN/+inf) is retired alone with an error, the others carry on; `_fail_all` is
kept for faults of the engine itself (a step that fails for every row).

Beside it: residency.py (which adapters are resident or being read, and pinning them for a request), rows.py
(a running row and what a step's logits do to it), forward.py (the decoder step), score.py (scoring).
"""
from __future__ import annotations

import logging
import random
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from lorakit.adapters.peft_files import fingerprint
from lorakit.generate import stop_ids
from lorakit.serve import forward, score as scoring
from lorakit.serve.request import AdapterUse, GenRequest, ScoreRequest, check_request, check_score, \
    send as _send  # noqa: F401 (AdapterUse, ScoreRequest re-exported)
from lorakit.serve.residency import AdapterLoadError, Residency
from lorakit.serve.rows import Row, emit
from lorakit.serve.slots import MAX_RANK, SlotBank

log = logging.getLogger("lorakit.serve")


class Engine:
    def __init__(self, model, tok, *, max_slots: int = 8, max_batch: int = 16, max_prefill_tokens: int = 4096,
                 base_fp: dict | None = None, max_rank: int = MAX_RANK):
        forward.check_supported(model)
        self.model, self.tok = model, tok
        self.stops = stop_ids(model, tok)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self._cv = threading.Condition()
        self.bank = SlotBank(model, max_slots, base_fp or fingerprint(model), max_rank)
        self.residency = Residency(self.bank, self._cv, self._poke)
        self.cache = forward.RowCache(model, max_batch)
        self.running: list[Row] = []
        self.waiting: deque[GenRequest] = deque()
        self.scoring: deque[ScoreRequest] = deque()
        self.vocab = model.get_input_embeddings().num_embeddings
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._wake = False  # something changed that may let a waiting request in
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"decode_steps": 0, "decode_rows": 0, "max_rows": 0, "prefills": 0, "errors": 0, "cancelled": 0, "tokens": 0, "scores": 0}

    # ---------------------------------------------------------------- public (any thread)
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=30)
        self.residency.shutdown()

    def submit(self, req: GenRequest | ScoreRequest) -> GenRequest | ScoreRequest:
        is_score = isinstance(req, ScoreRequest)
        check_score(req, self.max_len, self.vocab) if is_score else check_request(req)
        keys = {a.key for a in req.adapters}
        if len(keys) > self.bank.max_slots:
            raise ValueError(f"the request stacks {len(keys)} adapters; this server holds at most "
                             f"{self.bank.max_slots} in memory (--max-slots)")
        for a in req.adapters:
            if a.rank > self.bank.max_rank:
                raise ValueError(f"adapter {a.label or a.key!r} has rank {a.rank}; this server holds adapters of "
                                 f"rank at most {self.bank.max_rank} (--max-lora-rank)")
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self.residency.note(req)
            (self.scoring if is_score else self.waiting).append(req)
            self._wake = True
            self._cv.notify_all()
        return req

    def _poke(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between steps (e.g. unload an adapter)."""
        fut: Future = Future()
        with self._cv:
            self._commands.append((fn, fut))
            self._wake = True
            self._cv.notify_all()
        return fut

    def unload(self, keys: list[str]) -> Future:
        """Drop the resident adapters `keys` that no running request uses; the result lists their labels."""
        return self.call(lambda: self.residency.unload(keys))

    def info(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "scoring": len(self.scoring),
                **self.residency.info(), "max_batch": self.max_batch, "kv_bytes": self.cache.nbytes(),
                "adapter_loads": self.residency.loads, **self.stats}

    # ---------------------------------------------------------------- the loop (engine thread)
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self.running or self._wake):
                    self._cv.wait()
                if self._stopping:
                    break
                self._wake = False
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    fut.set_exception(e)
            try:
                self._admit()
                if self.scoring:
                    scoring.run_ready(self)
                if self.running:
                    self._step()
                if not self.running and not self.waiting and self.cache.cap > self.cache.chunk:
                    self.cache.clear()  # idle after long sequences: give that KV memory back
            except Exception as e:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")
        with self._cv:
            for req in [*self.waiting, *self.scoring]:
                _send(req, ("error", "the server is shutting down"))
            self.waiting.clear()
            self.scoring.clear()

    def _fail_all(self, message: str) -> None:
        for row in self.running:
            _send(row.req, ("error", message))
            self.residency.release(row.slots, row.mixture)
        self.stats["errors"] += len(self.running)
        self.running = []
        self.cache.clear()

    def _take_admissible(self) -> list[GenRequest]:
        """Waiting requests that fit now (free rows, prefill budget, adapter slots), in arrival order."""
        taken, tokens, keys = [], 0, []
        with self._cv:
            keep = deque()
            while self.waiting:
                req = self.waiting.popleft()
                if req.cancelled:
                    _send(req, ("done", "cancelled"))
                    self.stats["cancelled"] += 1
                    continue
                want = [a.key for a in req.adapters]
                fits = (len(self.running) + len(taken) < self.max_batch
                        and (not taken or tokens + len(req.prompt) <= self.max_prefill_tokens)
                        and self.residency.files_ready(req) and self.bank.can_acquire(keys + want))
                if fits:
                    taken.append(req)
                    tokens += len(req.prompt)
                    keys += want
                else:
                    keep.append(req)
            self.waiting = keep
        return taken

    def acquire(self, req: GenRequest | ScoreRequest) -> tuple[list[int], str | None] | None:
        """Pin req's adapters in slots (and its mixture's gates): (slots, mixture key). A broken adapter or
        mixture file fails this request alone: it gets the error, nothing stays pinned, None."""
        try:
            return self.residency.acquire(req)
        except AdapterLoadError as e:
            self.stats["errors"] += 1
            _send(req, ("error", str(e)))
            return None

    def _admit(self) -> None:
        rows: list[Row] = []
        for req in self._take_admissible():
            got = self.acquire(req)
            if got is None:
                continue
            slots, mix = got
            try:
                seed = req.seed if req.seed is not None else random.getrandbits(63)
                gen = torch.Generator().manual_seed(seed) if req.temperature > 0 else None
            except (ValueError, RuntimeError, OverflowError) as e:
                self.residency.release(slots, mix)
                self.stats["errors"] += 1
                _send(req, ("error", f"invalid seed {req.seed!r}: {e}"))
                continue
            rows.append(Row(req, slots, len(req.prompt), gen=gen, mixture=mix))
        if rows:
            self._prefill(rows)
            self._retire()

    def _prefill(self, rows: list[Row]) -> None:
        """Prefill new rows together; if that fails, one by one, so only a bad request fails."""
        start = len(self.running)
        self._set_batch(rows)
        try:
            logits = forward.prefill(self.model, self.cache, slice(start, start + len(rows)),
                                     [r.req.prompt for r in rows])
        except Exception as e:  # noqa: BLE001 - never the running requests' problem
            if len(rows) > 1:
                for r in rows:
                    self._prefill([r])
                return
            log.exception("prefill failed")
            _send(rows[0].req, ("error", f"prefill failed: {type(e).__name__}: {e}"))
            self.residency.release(rows[0].slots, rows[0].mixture)
            self.stats["errors"] += 1
            return
        self.running.extend(rows)
        self.stats["prefills"] += 1
        self._emit(rows, logits)

    def _step(self) -> None:
        rows = self.running
        self._set_batch(rows)
        try:
            logits = forward.decode(self.model, self.cache, [r.next_token for r in rows], [r.length for r in rows])
        except Exception:  # noqa: BLE001 - find the row at fault: run them one by one
            log.exception("decode step failed; retrying row by row")
            logits = self._decode_each(rows)
        for r in rows:
            r.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self._emit(rows, logits)
        self._retire()

    def _decode_each(self, rows: list[Row]) -> torch.Tensor:
        """Decode each row alone; a row that still fails is retired with its error. If every row fails,
        the fault is the engine's, not a request's: raise (the loop fails them all)."""
        out, last = [], None
        for i, r in enumerate(rows):
            self._set_batch([r])
            try:
                out.append(forward.decode(self.model, self.cache, [r.next_token], [r.length], rows=[i])[0])
            except Exception as e:  # noqa: BLE001
                last = e
                r.fail(f"generation failed for this request: {type(e).__name__}: {e}")
                out.append(None)
        if all(o is None for o in out):
            raise last
        like = next(o for o in out if o is not None)
        return torch.stack([like.new_zeros(like.shape) if o is None else o for o in out])

    def _set_batch(self, rows: list[Row]) -> None:
        self.bank.set_rows([(r.slots, [a.weight for a in r.req.adapters], r.mixture) for r in rows])

    def _emit(self, rows: list[Row], logits: torch.Tensor) -> None:
        emit(rows, logits, self.stops, self.max_len, self.stats)

    def _retire(self) -> None:
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.finished is None:
                i += 1
                continue
            if r.finished == "error":
                self.stats["errors"] += 1
                _send(r.req, ("error", r.error))
            else:
                _send(r.req, ("done", r.finished))
            self.residency.release(r.slots, r.mixture)
            self._wake = True  # a row and maybe a slot are free
            last = len(self.running) - 1
            if i != last:  # compact: the last row moves into the freed row
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            self.running.pop()

