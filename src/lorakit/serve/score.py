"""Scoring an answer on the engine thread: per answer token, KL(adapter || base) over the full vocabulary and
both models' log-probability of the token, from ONE forward over prompt + answer with two rows, the adapter's
and the base's (the same tokens), routed per row through the slot bank as a decode step is.

Why on the engine thread: per-row adapter routing lives in the slot bank (the batch's slot index and
coefficients), so a forward on another thread would race with the decode steps. A ScoreRequest is queued like
a generation request, waits like one for its adapters' files and a free slot, and runs between decode steps
(up to the prefill budget of tokens per turn). It fails alone: an adapter that cannot be loaded, a forward that
raises or logits that are not finite send that request an error; the running rows carry on.

Answer token j (0-based) is predicted at position len(prompt) + j - 1, from prompt + answer[:j]:
    kl[j] = sum_v p_a(v) (log p_a(v) - log p_b(v))     nats; float32 log-softmax of each row's logits
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

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
        logits = model.lm_head(h[:, prompt_len - 1 + c: prompt_len - 1 + c + m]).float()  # (2, m, vocab)
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


def run_ready(engine) -> None:
    """Score the queued requests whose adapters are read and fit in the slots now, in arrival order, until
    the turn's token budget (the prefill budget: two rows of prompt + answer each) is spent."""
    budget, first = engine.max_prefill_tokens, True
    while (req := _take(engine, budget, first)) is not None:
        budget -= 2 * (len(req.prompt) + len(req.answer))
        first = False
        _run(engine, req)


def _take(engine, budget: int, first: bool) -> ScoreRequest | None:
    """The first queued request that can run now (removed from the queue); cancelled ones are dropped."""
    with engine._cv:
        for req in list(engine.scoring):
            if req.cancelled:
                engine.scoring.remove(req)
                send(req, ("done", "cancelled"))
                engine.stats["cancelled"] += 1
                continue
            fits = first or 2 * (len(req.prompt) + len(req.answer)) <= budget
            if fits and engine.residency.files_ready(req) and engine.bank.can_acquire([a.key for a in req.adapters]):
                engine.scoring.remove(req)
                return req
    return None


def _run(engine, req: ScoreRequest) -> None:
    got = engine.acquire(req)  # sends the error itself if an adapter cannot be loaded
    if got is None:
        return
    slots, mix = got
    try:
        engine.bank.set_rows([(slots, [a.weight for a in req.adapters], mix), ([], [], None)])
        ids = torch.tensor(req.prompt + req.answer[:-1], device=engine.cache.device).repeat(2, 1)  # (2, s)
        result = kl_to_base(engine.model, forward.hidden(engine.model, ids), len(req.prompt), req.answer)
    except Exception as e:  # noqa: BLE001 - this request's problem, never the running rows'
        log.exception("scoring failed")
        engine.stats["errors"] += 1
        send(req, ("error", f"scoring failed for this request: {type(e).__name__}: {e}"))
        return
    finally:
        engine.residency.release(slots, mix)
    engine.stats["scores"] += 1
    send(req, ("score", result))
