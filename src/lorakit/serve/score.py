"""Scoring an answer on the engine thread: per answer token, KL(adapter || base) over the full vocabulary and
both models' log-probability of the token, from a forward over prompt + answer with two rows, the adapter's
and the base's (the same tokens), routed per row through the slot bank as a decode step is.

Long texts run a chunk per engine turn (ScoreJob, forward.extend into the job's own two-row KV cache), so three
4,096-token scorings interleave with the decode steps of others instead of holding the engine for each whole
forward. Why on the engine thread: per-row adapter routing lives in the slot bank (the batch's slot index and
coefficients), so a forward on another thread would race with the decode steps. A ScoreRequest is queued like
a generation request, waits like one for its adapters' files and a free slot, and runs between decode steps
(up to the prefill budget of tokens per turn). It fails alone: an adapter that cannot be loaded, a forward that
raises or logits that are not finite send that request an error; the running rows carry on.

Answer token j (0-based) is predicted at position len(prompt) + j - 1, from prompt + answer[:j]:
    kl[j] = sum_v p_a(v) (log p_a(v) - log p_b(v))     nats; float32 log-softmax of each row's logits
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lorakit import arch
from lorakit.serve import forward
from lorakit.serve.request import ScoreRequest, send

log = logging.getLogger("lorakit.serve")
CHUNK = 64  # answer positions whose (2, CHUNK, vocab) logits are held at once


@dataclass
class Score:
    kl: list[float]  # per answer token, nats
    logprobs: list[float]  # log p_adapter(answer token | prefix)
    base_logprobs: list[float]  # log p_base(answer token | prefix)

    def summary(self) -> dict:
        n = len(self.kl)
        return {"mean": sum(self.kl) / n if n else 0.0, "max": max(self.kl, default=0.0), "sum": sum(self.kl)}


@torch.no_grad()
def kl_to_base(model, h: torch.Tensor, prompt_len: int, answer: list[int], chunk: int = CHUNK) -> Score:
    """h (2, s, hidden): row 0 the adapter's, row 1 the base's final hidden states over prompt + answer[:-1]."""
    n = len(answer)
    target = torch.tensor(answer, device=h.device)
    kl, lp_a, lp_b = [], [], []
    for c in range(0, n, chunk):
        m = min(n, c + chunk) - c
        logits = arch.logits(model, h[:, prompt_len - 1 + c: prompt_len - 1 + c + m]).float()  # (2, m, vocab)
        if not torch.isfinite(logits).all():
            which = "the adapter's" if not torch.isfinite(logits[0]).all() else "the base's"
            raise ValueError(f"{which} logits are not finite (NaN/inf) at answer token {c} or after: the adapter "
                             "or stack weights overflow")
        logp = torch.log_softmax(logits, dim=-1)  # (2, m, vocab)
        kl += (logp[0].exp() * (logp[0] - logp[1])).sum(-1).clamp_min(0.0).tolist()  # (m,)
        picked = logp.gather(2, target[c: c + m].expand(2, m)[..., None])[..., 0]  # (2, m)
        lp_a += picked[0].tolist()
        lp_b += picked[1].tolist()
    return Score(kl, lp_a, lp_b)


@dataclass
class ScoreJob:
    """A scoring request under way: its two rows (adapter, base) run prompt + answer[:-1] a chunk per engine turn
    into their own KV cache, so a long text interleaves with the decode steps of everyone else."""
    req: ScoreRequest
    slots: list[int]
    mixture: str | None
    cache: forward.RowCache
    done: int = 0  # positions run so far
    score: Score = field(default_factory=lambda: Score([], [], []))

    @property
    def seq(self) -> list[int]:
        return self.req.prompt + self.req.answer[:-1]


def run_ready(engine, positions: int) -> int:
    """Advance the scoring under way by one chunk of `positions` (two rows: at fixed boundaries, so its numbers never
    depend on what else runs), starting the first queued request that can run when none is. Returns tokens run."""
    job = engine.score_job
    if job is None:
        req = _take(engine)
        if req is None:
            return 0
        got = engine.acquire(req)  # sends the error itself if an adapter cannot be loaded
        if got is None:
            return 0
        cache = forward.RowCache(engine.model, 2)
        job = engine.score_job = ScoreJob(req, got[0], got[1], cache)
    if job.req.cancelled:
        _finish(engine, job, ("done", "cancelled"))
        engine.stats["cancelled"] += 1
        return 0
    req, P, n = job.req, len(job.req.prompt), len(job.req.answer)
    start = job.done
    end = min(len(job.seq), start + positions)
    try:
        engine.bank.set_rows([(job.slots, [a.weight for a in req.adapters], job.mixture), ([], [], None)])
        ids = torch.tensor(job.seq[start:end]).repeat(2, 1)  # (2, c)
        h = forward.extend(engine.model, job.cache, slice(0, 2), ids, start, len(job.seq))  # (2, c, hidden)
        j0, j1 = max(0, start - (P - 1)), min(n, end - (P - 1))  # answer tokens predicted in this chunk
        if j1 > j0:
            part = kl_to_base(engine.model, h, P + j0 - start, req.answer[j0:j1])
            job.score.kl += part.kl
            job.score.logprobs += part.logprobs
            job.score.base_logprobs += part.base_logprobs
    except Exception as e:  # noqa: BLE001 - this request's problem, never the running rows'
        log.exception("scoring failed")
        engine.stats["errors"] += 1
        _finish(engine, job, ("error", f"scoring failed for this request: {type(e).__name__}: {e}"))
        return 2 * (end - start)
    job.done = end
    if end == len(job.seq):
        engine.stats["scores"] += 1
        _finish(engine, job, ("score", job.score))
    return 2 * (end - start)


def _finish(engine, job: ScoreJob, event: tuple) -> None:
    engine.residency.release(job.slots, job.mixture)
    engine.score_job = None
    engine._poke()  # the next queued scoring may start
    job.cache.clear()
    send(job.req, event)


def _take(engine) -> ScoreRequest | None:
    """The first queued request that can run now (removed from the queue); cancelled ones are dropped."""
    with engine._cv:
        for req in list(engine.scoring):
            if req.cancelled:
                engine.scoring.remove(req)
                send(req, ("done", "cancelled"))
                engine.stats["cancelled"] += 1
                continue
            if engine.residency.files_ready(req) and engine.bank.can_acquire([a.key for a in req.adapters]):
                engine.scoring.remove(req)
                return req
    return None
