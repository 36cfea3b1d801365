"""A running request's row in the engine's batch, and what happens to each row's logits after a step: the next
token is picked (greedy or sampled), checked against the stop tokens and the length limits, and sent.

A row whose logits are not finite, whose sampling fails, or whose receiver is gone is marked finished alone
(error or cancelled); the engine retires it after the step, the other rows carry on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lorakit.serve.request import GenRequest, sample, send


@dataclass
class Row:
    req: GenRequest
    slots: list[int]
    length: int  # tokens in this row's cache
    next_token: int = -1
    generated: int = 0
    gen: torch.Generator | None = None
    finished: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str = ""
    mixture: str | None = None  # the resident mixture whose gates weight `slots` per token

    @property
    def prefilling(self) -> bool:
        """Its prompt is still being run into the cache, a chunk per turn (a long prompt)."""
        return self.length < len(self.req.prompt)

    def fail(self, message: str) -> None:
        self.finished, self.error = "error", message


def emit(rows: list[Row], logits: torch.Tensor, stops: set[int], max_len: int, stats: dict) -> None:
    """Pick each row's next token from logits (n, vocab), send it, and mark finished rows (stats counts the
    tokens sent and the rows cancelled)."""
    greedy = logits.argmax(-1).tolist()
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()

    def pick(i: int, r: Row) -> int:
        return greedy[i] if r.gen is None else sample(logits[i], r.req.temperature, r.req.top_p, r.gen)
    deliver(rows, pick, broken, stops, max_len, stats)


def deliver(rows: list[Row], pick, broken: list[bool], stops: set[int], max_len: int, stats: dict) -> None:
    """For each unfinished row i: its token pick(i, row) (unless its logits were not finite, broken[i]), sent, and
    the row marked finished where it stops, reaches its length or is cancelled."""
    for i, r in enumerate(rows):
        if r.finished is not None:
            continue
        if r.req.cancelled:
            r.finished = "cancelled"
            stats["cancelled"] += 1
            continue
        if broken[i]:
            r.fail("generation failed for this request: the model produced non-finite logits (NaN/inf); "
                   "the adapter or stack weights it uses overflow")
            continue
        try:
            tok = pick(i, r)
        except Exception as e:  # noqa: BLE001 - this request's sampling, nobody else's
            r.fail(f"sampling failed for this request: {type(e).__name__}: {e}")
            continue
        if tok in stops and not r.req.ignore_eos:
            r.finished = "stop"
            continue
        if not send(r.req, ("token", tok)):
            r.finished = "cancelled"  # nobody can receive it
            stats["cancelled"] += 1
            continue
        r.generated += 1
        stats["tokens"] += 1
        r.next_token = tok
        if r.generated >= r.req.max_tokens or r.length + 1 >= max_len:
            r.finished = "length"


def decode_each(rows: list[Row], one: Callable[[int, Row], torch.Tensor]) -> torch.Tensor:
    """After a batch step failed: decode each row alone (`one(i, row)` -> that row's logits); a row that still
    fails is finished with its error and gets zero logits (it is retired after the step). If every row fails, the
    fault is the engine's, not a request's: raise it (the loop fails them all)."""
    out, last = [], None
    for i, r in enumerate(rows):
        try:
            out.append(one(i, r))
        except Exception as e:  # noqa: BLE001
            last = e
            r.fail(f"generation failed for this request: {type(e).__name__}: {e}")
            out.append(None)
    if all(o is None for o in out):
        raise last
    like = next(o for o in out if o is not None)
    return torch.stack([like.new_zeros(like.shape) if o is None else o for o in out])
