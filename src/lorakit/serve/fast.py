"""The static-cache engine: Engine's interface (submit, streaming sinks, cancel, unload, info, scoring) over
serve/decoder.py: a KV cache allocated once, prompts prefilled in chunks between decode steps, decode replayed
from CUDA graphs on a GPU (the same code runs eagerly on the CPU), the next tokens chosen on the device.

Memory: the cache for `max_batch` rows of `max_len` positions is computed from the model's shapes and refused at
start-up (ValueError naming the sizes) when it does not fit in the device's free memory. A request that cannot fit
in a row (prompt at least max_len) is refused at submit; one that arrives when `max_waiting` requests already wait
for a row is refused too ("the KV cache is full"), before anything is allocated for it.

Each turn after admission: prefill chunks for rows still reading their prompt, `prefill_chunk` tokens in all (the
rows whose next chunk starts at the same position run as one batch); a row whose prompt is done gets its first
token; then one decode step for every row that has a token to feed. A new request starts streaming after at most a
turn's prefill, while the others keep decoding between its chunks.

Isolation as Engine's: a row owns its cache row (zeroed when taken), attention reads that row's positions only; a
request whose prefill or decode raises, or whose logits are not finite, is retired alone.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from lorakit.serve.decoder import Decoder, cache_bytes
from lorakit.serve.engine import Engine
from lorakit.serve.request import GenRequest, ScoreRequest, send
from lorakit.serve.rows import Row, decode_each, deliver
from lorakit.serve.sampler import choose

log = logging.getLogger("lorakit.serve")


@dataclass
class CacheRow(Row):
    row: int = -1  # the cache row it owns
    done: int = 0  # prompt tokens prefilled
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0


class CacheFull(RuntimeError):
    """Every cache row is taken and the queue for one is full: try again later (HTTP 429)."""


class StaticEngine(Engine):
    def __init__(self, model, tok, *, max_batch: int = 16, max_len: int | None = None, prefill_chunk: int = 2048,
                 max_waiting: int | None = None, graphs: bool | None = None, **engine_kw):
        """engine_kw: Engine's (max_slots, max_rank, base_fp); max_prefill_tokens is taken as prefill_chunk."""
        prefill_chunk = engine_kw.pop("max_prefill_tokens", prefill_chunk)
        super().__init__(model, tok, max_batch=max_batch, max_prefill_tokens=1 << 62, **engine_kw)
        self.max_len = min(self.max_len, max_len or self.max_len)
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        w = next(model.parameters())
        need = cache_bytes(model.config, max_batch, self.max_len, w.dtype)
        if w.device.type == "cuda":
            free = torch.cuda.mem_get_info(w.device)[0]
            if need > 0.9 * free:
                raise ValueError(f"the KV cache for {max_batch} rows of {self.max_len} positions needs "
                                 f"{need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB of device memory is free "
                                 "(lower --max-batch or the context length)")
        self.decoder = Decoder(model, self.bank, max_batch, self.max_len, graphs=graphs)

    def submit(self, req: GenRequest | ScoreRequest) -> GenRequest | ScoreRequest:
        if isinstance(req, GenRequest):
            if len(req.prompt) >= self.max_len:
                raise ValueError(f"the prompt has {len(req.prompt)} tokens; this server's rows hold "
                                 f"{self.max_len} positions (prompt and generated tokens)")
            with self._cv:
                busy = len(self.running) >= self.max_batch
                if self.max_waiting is not None and busy and len(self.waiting) >= self.max_waiting:
                    raise CacheFull(f"the KV cache is full: all {self.max_batch} rows are in use and "
                                     f"{len(self.waiting)} requests wait; try again later")
        return super().submit(req)

    def info(self) -> dict:
        return {**super().info(), "kv_bytes": self.decoder.cache.nbytes(), "max_len": self.max_len,
                "graphs": self.decoder.captures,
                "graph_failures": self.decoder.capture_failures,
                "compile_failures": self.decoder.compile_failures}

    # ---------------------------------------------------------------- admission
    def _admit(self, budget: int = 0) -> None:
        t0 = time.perf_counter()
        try:
            self._admit_ready()
        finally:
            self.stats["admit_s"] += time.perf_counter() - t0

    def _admit_ready(self) -> None:
        for req in self._take_admissible():
            got = self.acquire(req)
            if got is None:
                continue
            slots, mix = got
            seed = req.seed if req.seed is not None else random.getrandbits(63)
            if not (isinstance(seed, int) and 0 <= seed < 2**63):
                self.residency.release(slots, mix)
                self.stats["errors"] += 1
                send(req, ("error", f"invalid seed {req.seed!r}: must be an integer in [0, 2^63)"))
                continue
            self.stats["queue_s"] += time.perf_counter() - req.submitted  # submitted -> admitted, summed
            row = self.decoder.cache.take()
            for t in self.decoder.cache.k + self.decoder.cache.v:
                t[row].zero_()  # nothing of an earlier request stays
            self.running.append(CacheRow(req, slots, 0, mixture=mix, row=row, seed=seed,
                                         temperature=req.temperature, top_p=req.top_p))

    # ---------------------------------------------------------------- a turn
    def _prefill_chunks(self, chunks: int) -> int:
        return 0  # this engine's prompts run in _step's prefill turn (prefill_chunk tokens at a time)

    def _step(self) -> None:
        self._prefill_turn()
        ready = [r for r in self.running if r.finished is None and r.done == len(r.req.prompt) and r.generated]
        if ready:
            self._decode(ready)
        self._retire()

    def _prefill_turn(self) -> None:
        t0 = time.perf_counter()
        budget, groups = self.prefill_chunk, {}
        for r in self.running:
            if r.finished is None and r.done < len(r.req.prompt) and budget > 0:
                if r.req.cancelled:
                    r.finished = "cancelled"
                    self.stats["cancelled"] += 1
                    continue
                n = min(len(r.req.prompt) - r.done, budget)
                budget -= n
                groups.setdefault(r.done, []).append((r, r.req.prompt[r.done:r.done + n]))
        for start, group in groups.items():
            self._prefill(group, start)
        if groups:
            self.stats["prefill_s"] += time.perf_counter() - t0  # engine-thread time, up to the first tokens read

    def _prefill(self, group: list[tuple[CacheRow, list[int]]], start: int) -> None:
        rows = [r for r, _ in group]
        self._set_batch(rows)
        try:
            logits = self.decoder.prefill([r.row for r in rows], [c for _, c in group], start,
                                          [len(r.req.prompt) for r in rows])
        except Exception as e:  # noqa: BLE001 - retry one by one, so only a bad request fails
            if len(group) > 1:
                log.warning("a prefill of %d rows failed (%s: %s); running them one by one", len(group),
                            type(e).__name__, e)
                self.stats["prefill_splits"] += 1
                for one in group:
                    self._prefill([one], start)
                return
            log.exception("prefill failed")
            rows[0].fail(f"prefill failed: {type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        for r, c in group:
            r.done += len(c)
            r.length = r.done
        finished = [i for i, r in enumerate(rows) if r.done == len(r.req.prompt)]
        if finished:
            self._emit([rows[i] for i in finished], logits[finished])

    def _decode(self, rows: list[CacheRow]) -> None:
        t0 = time.perf_counter()
        try:
            self._decode_step(rows)
        finally:
            self.stats["decode_s"] += time.perf_counter() - t0  # engine-thread seconds, tokens read back included

    def _decode_step(self, rows: list[CacheRow]) -> None:
        try:
            logits = self._decode_rows(rows, eager=False)
        except Exception:  # noqa: BLE001 - find the row at fault: run them one by one
            log.exception("decode step failed; retrying row by row")
            logits = self._decode_each(rows)
        for r in rows:
            r.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self._emit(rows, logits)

    def _decode_rows(self, rows: list[CacheRow], eager: bool) -> torch.Tensor:
        spec = [(r.slots, [a.weight for a in r.req.adapters], r.mixture) for r in rows]
        eager = eager or any(r.mixture is not None for r in rows)
        routing = None
        if eager:
            self.bank.set_rows(spec)
        elif any(r.slots for r in rows):
            routing = self.bank.batch(spec)
        return self.decoder.decode([r.row for r in rows], [r.next_token for r in rows], [r.length for r in rows],
                                   routing, eager=eager)

    def _decode_each(self, rows: list[CacheRow]) -> torch.Tensor:
        return decode_each(rows, lambda i, r: self._decode_rows([r], eager=True)[0])

    def _emit(self, rows: list[CacheRow], logits: torch.Tensor) -> None:
        """Every row's next token chosen on the device; one transfer of (token, broken) pairs."""
        dev = logits.device
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
        if all(r.temperature == 0 for r in rows):
            tokens = logits.argmax(-1)
        else:
            f = lambda vals, dt: torch.tensor(vals, dtype=dt).to(dev)  # noqa: E731
            tokens = choose(logits.nan_to_num(), f([r.temperature for r in rows], torch.float64),
                            f([r.top_p for r in rows], torch.float64), f([r.seed for r in rows], torch.int64),
                            f([r.length for r in rows], torch.int64))
        pairs = torch.stack([tokens, broken.long()], 1).tolist()
        deliver(rows, lambda i, r: pairs[i][0], [p[1] == 1 for p in pairs], self.stops, self.max_len, self.stats)

    # ---------------------------------------------------------------- retirement
    def _retire(self) -> None:
        keep = []
        for r in self.running:
            if r.finished is None:
                keep.append(r)
                continue
            if r.finished == "error":
                self.stats["errors"] += 1
                send(r.req, ("error", r.error))
            else:
                send(r.req, ("done", r.finished))
            self.residency.release(r.slots, r.mixture)
            self.decoder.cache.give(r.row)
            self._wake = True  # a row and maybe a slot are free
        self.running = keep

    def _fail_all(self, message: str) -> None:
        for r in self.running:
            self.decoder.cache.give(r.row)
        super()._fail_all(message)
