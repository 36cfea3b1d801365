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
"""
from __future__ import annotations

import logging
import random
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from lorakit.adapters.peft_files import AdapterFile, fingerprint
from lorakit.generate import stop_ids
from lorakit.serve import forward, score as scoring
from lorakit.serve.request import AdapterUse, GenRequest, ScoreRequest, check_request, check_score, sample, \
    send as _send  # noqa: F401 (AdapterUse, ScoreRequest re-exported)
from lorakit.serve.slots import SlotBank

log = logging.getLogger("lorakit.serve")


@dataclass
class _Row:
    req: GenRequest
    slots: list[int]
    length: int  # tokens in this row's cache
    next_token: int = -1
    generated: int = 0
    gen: torch.Generator | None = None
    finished: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str = ""
    mixture: str | None = None  # the resident mixture whose gates weight `slots` per token

    def fail(self, message: str) -> None:
        self.finished, self.error = "error", message


class Engine:
    def __init__(self, model, tok, *, max_slots: int = 8, max_batch: int = 16, max_prefill_tokens: int = 4096,
                 base_fp: dict | None = None):
        forward.check_supported(model)
        self.model, self.tok = model, tok
        self.stops = stop_ids(model, tok)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.bank = SlotBank(model, max_slots, base_fp or fingerprint(model))
        self.cache = forward.RowCache(model, max_batch)
        self.running: list[_Row] = []
        self.waiting: deque[GenRequest] = deque()
        self.scoring: deque[ScoreRequest] = deque()
        self.vocab = model.get_input_embeddings().num_embeddings
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._cv = threading.Condition()
        self._wake = False  # something changed that may let a waiting request in
        self._prefetch: dict[str, Future] = {}  # adapter key -> AdapterFile being read from disk
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-adapter-load")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.labels: dict[str, str] = {}  # adapter key -> "name@version"
        self.stats = {"decode_steps": 0, "decode_rows": 0, "max_rows": 0, "prefills": 0, "adapter_loads": 0,
                      "errors": 0, "cancelled": 0, "tokens": 0, "scores": 0}

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
        self._loader.shutdown(wait=False, cancel_futures=True)

    def submit(self, req: GenRequest | ScoreRequest) -> GenRequest | ScoreRequest:
        is_score = isinstance(req, ScoreRequest)
        check_score(req, self.max_len, self.vocab) if is_score else check_request(req)
        keys = {a.key for a in req.adapters}
        if len(keys) > self.bank.max_slots:
            raise ValueError(f"the request stacks {len(keys)} adapters; this server holds at most "
                             f"{self.bank.max_slots} in memory (--max-slots)")
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            for a in req.adapters:
                self.labels[a.key] = a.label or a.key
                self._ensure_prefetch(a)
            if req.mixture is not None:
                self.labels[req.mixture.key] = req.mixture.label or req.mixture.key
            (self.scoring if is_score else self.waiting).append(req)
            self._wake = True
            self._cv.notify_all()
        return req

    def _ensure_prefetch(self, a: AdapterUse) -> None:
        """Start reading adapter `a` from disk on the loader thread unless resident or under way (holds _cv)."""
        if a.key in self.bank.resident or a.key in self._prefetch:
            return
        fut = self._loader.submit(a.load)
        self._prefetch[a.key] = fut
        fut.add_done_callback(lambda _: self._poke())

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
        def run():
            return [self.labels.get(k, k) for k in keys if self.bank.unload(k)]
        return self.call(run)

    def info(self) -> dict:
        resident = [self.labels.get(k, k) for k in self.bank.resident]
        mixtures = [self.labels.get(k, k) for k in self.bank.mixtures]
        return {"running": len(self.running), "waiting": len(self.waiting), "scoring": len(self.scoring),
                "resident": resident,
                "resident_mixtures": mixtures,
                "max_slots": self.bank.max_slots, "max_batch": self.max_batch, "slot_bytes": self.bank.nbytes(),
                "kv_bytes": self.cache.nbytes(), **self.stats}

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

    def _release(self, slots: list[int], mixture: str | None) -> None:
        for s in slots:
            self.bank.release(s)
        if mixture is not None:
            self.bank.release_mixture(mixture)

    def _fail_all(self, message: str) -> None:
        for row in self.running:
            _send(row.req, ("error", message))
            self._release(row.slots, row.mixture)
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
                        and self._files_ready(req) and self.bank.can_acquire(keys + want))
                if fits:
                    taken.append(req)
                    tokens += len(req.prompt)
                    keys += want
                else:
                    keep.append(req)
            self.waiting = keep
        return taken

    def _files_ready(self, req: GenRequest) -> bool:
        """All of req's adapters are resident or read from disk (holds _cv). Starts reads still missing."""
        ready = True
        for a in req.adapters:
            if a.key in self.bank.resident:
                continue
            self._ensure_prefetch(a)  # e.g. evicted since the request was submitted
            ready = ready and self._prefetch[a.key].done()
        return ready

    def _file(self, key: str, load: Callable[[], AdapterFile]) -> Callable[[], AdapterFile]:
        def get():
            with self._cv:
                fut = self._prefetch.pop(key, None)
            return fut.result() if fut is not None else load()
        return get

    def _acquire(self, req: GenRequest | ScoreRequest) -> tuple[list[int], str | None] | None:
        """Pin req's adapters in slots (and its mixture's gates): (slots, mixture key). A broken adapter or
        mixture file fails this request alone: it gets the error, nothing stays pinned, None."""
        slots: list[int] = []
        mix = None
        try:
            for a in req.adapters:
                loaded = a.key in self.bank.resident
                slots.append(self.bank.acquire(a.key, self._file(a.key, a.load)))
                self.stats["adapter_loads"] += not loaded
            if req.mixture is not None:
                self.bank.acquire_mixture(req.mixture.key, req.mixture.load)
                mix = req.mixture.key
        except Exception as e:  # noqa: BLE001 - a broken adapter or mixture file fails this request only
            self._release(slots, mix)
            self.stats["errors"] += 1
            what = "mixture" if len(slots) == len(req.adapters) and req.mixture else "adapter"
            _send(req, ("error", f"{what} could not be loaded: {e}"))
            return None
        return slots, mix

    def _admit(self) -> None:
        rows: list[_Row] = []
        for req in self._take_admissible():
            got = self._acquire(req)
            if got is None:
                continue
            slots, mix = got
            try:
                seed = req.seed if req.seed is not None else random.getrandbits(63)
                gen = torch.Generator().manual_seed(seed) if req.temperature > 0 else None
            except (ValueError, RuntimeError, OverflowError) as e:
                self._release(slots, mix)
                self.stats["errors"] += 1
                _send(req, ("error", f"invalid seed {req.seed!r}: {e}"))
                continue
            rows.append(_Row(req, slots, len(req.prompt), gen=gen, mixture=mix))
        if rows:
            self._prefill(rows)
            self._retire()

    def _prefill(self, rows: list[_Row]) -> None:
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
            self._release(rows[0].slots, rows[0].mixture)
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

    def _decode_each(self, rows: list[_Row]) -> torch.Tensor:
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

    def _set_batch(self, rows: list[_Row]) -> None:
        self.bank.set_rows([(r.slots, [a.weight for a in r.req.adapters], r.mixture) for r in rows])

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from logits (n, vocab), send it, and mark finished rows.
        A row whose logits are not finite, or whose sampling fails, is retired alone with an error."""
        greedy = logits.argmax(-1).tolist()
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()
        for i, r in enumerate(rows):
            if r.finished is not None:
                continue
            if r.req.cancelled:
                r.finished = "cancelled"
                self.stats["cancelled"] += 1
                continue
            if broken[i]:
                r.fail("generation failed for this request: the model produced non-finite logits (NaN/inf); "
                       "the adapter or stack weights it uses overflow")
                continue
            try:
                tok = greedy[i] if r.gen is None else sample(logits[i], r.req.temperature, r.req.top_p, r.gen)
            except Exception as e:  # noqa: BLE001 - this request's sampling, nobody else's
                r.fail(f"sampling failed for this request: {type(e).__name__}: {e}")
                continue
            if tok in self.stops and not r.req.ignore_eos:
                r.finished = "stop"
                continue
            if not _send(r.req, ("token", tok)):
                r.finished = "cancelled"  # nobody can receive it
                self.stats["cancelled"] += 1
                continue
            r.generated += 1
            self.stats["tokens"] += 1
            r.next_token = tok
            if r.generated >= r.req.max_tokens or r.length + 1 >= self.max_len:
                r.finished = "length"

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
            self._release(r.slots, r.mixture)
            self._wake = True  # a row and maybe a slot are free
            last = len(self.running) - 1
            if i != last:  # compact: the last row moves into the freed row
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            self.running.pop()

