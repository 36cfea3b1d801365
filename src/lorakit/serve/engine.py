"""The serving engine: one background thread owns the model and runs continuous batching.

Each turn of the loop
  1. runs queued commands (e.g. unload an adapter),
  2. admits waiting requests into free rows: their adapters are made resident in memory slots
     (LRU; the files are read from disk by a loader thread while others decode) and their
     prompts prefilled together; a prompt longer than the turn's token budget, and scoring, run a chunk
     per turn instead (`_advance`), so no one request holds the others' next tokens for long,
  3. runs ONE decode step for every running row together, whatever adapter (or stack) each row
     uses: the per-row slot index goes to `lorakit.kernels.lora_delta` through LoraLinear.routing
     (a row that runs a mixture of LoRAs gets per-token coefficients from its router's gates, slots.py),
  4. streams each row's new token to its request and retires finished rows.

A request that arrives while others decode joins at the next turn. Results go to each request's `sink(event)` on the
engine thread: ("token", id), ("done", "stop" | "length" | "cancelled") or ("error", message). A ScoreRequest
(score.py: per-token KL to the base) waits for its adapters likewise and runs between steps on this thread.

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
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from lorakit import arch
from lorakit.adapters.peft_files import fingerprint
from lorakit.generate import stop_ids
from lorakit.serve import forward, score as scoring
from lorakit.serve.request import AdapterUse, GenRequest, ScoreRequest, check_request, check_score, \
    send as _send  # noqa: F401 (AdapterUse, ScoreRequest re-exported)
from lorakit.serve.residency import AdapterLoadError, Residency
from lorakit.serve.rows import Row, decode_each, emit
from lorakit.serve.slots import MAX_RANK, SlotBank

log = logging.getLogger("lorakit.serve")
CHUNK = 32  # a long prompt and a scored text run in forwards of this many positions, at fixed boundaries (the
# numbers a request gets never depend on what else runs); a turn runs as many chunks as its token budget holds
MIN_CHUNK_S = 0.02  # a turn's chunks may take as long as a decode step, and at least this


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
        self.score_job = None  # the scoring under way (score.ScoreJob)
        self._decode_s, self._token_s, self._turn = 0.0, 0.0, 0  # recent decode step and prefill-token times
        self.running: list[Row] = []
        self.waiting: deque[GenRequest] = deque()
        self.scoring: deque[ScoreRequest] = deque()
        self.vocab = model.get_input_embeddings().num_embeddings
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._wake = False  # something changed that may let a waiting request in
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"decode_steps": 0, "decode_rows": 0, "max_rows": 0, "prefills": 0, "prefill_splits": 0,
                      "errors": 0, "cancelled": 0, "tokens": 0, "scores": 0, "acquire_s": 0.0, "prefill_s": 0.0,
                      "admit_s": 0.0, "decode_s": 0.0, "queue_s": 0.0}

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
            if not is_score:
                req.submitted = time.perf_counter()
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

    def queued(self) -> list[GenRequest | ScoreRequest]:
        """A snapshot of the requests submitted and not yet admitted (generations, then scorings)."""
        with self._cv:
            return [*self.waiting, *self.scoring]

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
                while not (self._stopping or self.running or self._wake or self.score_job):
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
                budget = self._budget()
                self._admit(budget)
                self._advance(budget)
                if self.running:
                    self._step()
                if not self.running and not self.waiting and self.cache.cap > self.cache.chunk:
                    self.cache.clear()  # idle after long sequences: give that KV memory back
            except Exception as e:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")
        with self._cv:
            if self.score_job is not None:
                _send(self.score_job.req, ("error", "the server is shutting down"))
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

    def _budget(self) -> int:
        """Tokens of long prompts and scoring to run this turn: about one decode step's time (so others' tokens
        come at most about twice as slowly), from the measured cost of a token; every prompt that fits in it is
        prefilled whole, together with the others that fit."""
        if not self._token_s:
            return CHUNK
        return int(min(self.max_prefill_tokens, max(CHUNK, max(self._decode_s, MIN_CHUNK_S) / self._token_s)))

    def _timed(self, attr: str, seconds: float, n: int = 1) -> None:
        old = getattr(self, attr)
        new = seconds / max(1, n)
        setattr(self, attr, new if not old else 0.7 * old + 0.3 * new)

    def _advance(self, budget: int) -> None:
        """Run this turn's chunks of the long prompts being prefilled and of the scoring under way (which goes
        first alternates by turn, so neither starves the other)."""
        self._turn += 1
        chunks, scoring_first = max(1, budget // CHUNK), self._turn % 2
        if scoring_first and (self.score_job or self.scoring):
            chunks -= self._score()
        chunks -= self._prefill_chunks(chunks)
        if chunks > 0 and not scoring_first and (self.score_job or self.scoring):
            self._score()

    def _score(self) -> int:
        """One chunk of the scoring under way (two rows of CHUNK positions); 1 if it ran."""
        t0 = time.perf_counter()
        used = scoring.run_ready(self, CHUNK)
        if used:
            self._timed("_token_s", time.perf_counter() - t0, used)
        return int(used > 0)

    def _prefill_chunks(self, chunks: int) -> int:
        """Run up to `chunks` chunks of the prompts still being prefilled, one per row in turn; returns how many."""
        used = 0
        while used < chunks:
            pending = [i for i, r in enumerate(self.running) if r.prefilling and r.finished is None]
            if not pending:
                break
            k = self._turn % len(pending)
            for i in pending[k:] + pending[:k]:
                if used < chunks:
                    used += self._prefill_chunk(i)
        self._retire()
        return used

    def _prefill_chunk(self, i: int) -> int:
        """One chunk of row i's prompt into its cache row; its first token once the prompt is in. 1 if it ran."""
        r = self.running[i]
        if r.req.cancelled:
            r.finished = "cancelled"
            self.stats["cancelled"] += 1
            return 0
        c = min(CHUNK, len(r.req.prompt) - r.length)
        self._set_batch([r])
        t0 = time.perf_counter()
        try:
            ids = torch.tensor([r.req.prompt[r.length: r.length + c]])  # (1, c)
            h = forward.extend(self.model, self.cache, slice(i, i + 1), ids, r.length, len(r.req.prompt))  # (1, c, d)
            logits = arch.logits(self.model, h[:, -1]).float() if r.length + c == len(r.req.prompt) else None
        except Exception as e:  # noqa: BLE001 - this request's prompt, nobody else's
            log.exception("prefill failed")
            r.fail(f"prefill failed: {type(e).__name__}: {e}")
            return 1
        self._timed("_token_s", time.perf_counter() - t0, c)
        r.length += c
        if logits is not None:  # the whole prompt is in: its first token
            self.stats["prefills"] += 1
            self._emit([r], logits)
        return 1

    def _take_admissible(self, budget: int = 1 << 62) -> list[GenRequest]:
        """Waiting requests that fit now (free rows, the turn's token budget, adapter slots), in arrival order; a
        prompt longer than CHUNK takes a row and is prefilled a chunk at a time."""
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
                long = len(req.prompt) > CHUNK
                fits = (len(self.running) + len(taken) < self.max_batch
                        and (long or tokens + len(req.prompt) <= max(budget, CHUNK))
                        and self.residency.files_ready(req) and self.bank.can_acquire(keys + want))
                if fits:
                    taken.append(req)
                    tokens += 0 if long else len(req.prompt)
                    keys += want
                else:
                    keep.append(req)
            self.waiting = keep
        return taken

    def acquire(self, req: GenRequest | ScoreRequest) -> tuple[list[int], str | None] | None:
        """Pin req's adapters in slots (and its mixture's gates): (slots, mixture key). A broken adapter or
        mixture file fails this request alone: it gets the error, nothing stays pinned, None."""
        t0 = time.perf_counter()
        try:
            return self.residency.acquire(req)
        except AdapterLoadError as e:
            self.stats["errors"] += 1
            _send(req, ("error", str(e)))
            return None
        finally:
            self.stats["acquire_s"] += time.perf_counter() - t0  # adapters written into slots: engine-thread time

    def _admit(self, budget: int) -> None:
        rows: list[Row] = []
        for req in self._take_admissible(budget):
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
            if len(req.prompt) > CHUNK:  # a row of its own now, its prompt run a chunk per turn
                self.cache.zero(slice(len(self.running), len(self.running) + 1))
                self.running.append(Row(req, slots, 0, gen=gen, mixture=mix))
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
        idx = [i for i, r in enumerate(self.running) if not r.prefilling]  # cache rows that decode
        if not idx:
            return
        rows = [self.running[i] for i in idx]
        self._set_batch(rows)
        t0 = time.perf_counter()
        try:
            logits = forward.decode(self.model, self.cache, [r.next_token for r in rows], [r.length for r in rows],
                                    rows=None if idx[-1] == len(idx) - 1 else idx)
        except Exception:  # noqa: BLE001 - find the row at fault: run them one by one
            log.exception("decode step failed; retrying row by row")
            logits = self._decode_each(rows, idx)
        self._timed("_decode_s", time.perf_counter() - t0)
        for r in rows:
            r.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self._emit(rows, logits)
        self._retire()

    def _decode_each(self, rows: list[Row], idx: list[int]) -> torch.Tensor:
        """Decode each row alone (rows.decode_each: a row that still fails is retired with its error)."""
        def one(i: int, r: Row) -> torch.Tensor:
            self._set_batch([r])
            return forward.decode(self.model, self.cache, [r.next_token], [r.length], rows=[idx[i]])[0]
        return decode_each(rows, one)

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

