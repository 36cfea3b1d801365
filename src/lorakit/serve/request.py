"""What the engine is asked to do: a generation or a scoring request, the adapters it uses, their checks, and
sampling.

`GenRequest.sink(event)` receives ("token", id), ("done", reason) or ("error", message) on the engine thread;
`ScoreRequest.sink(event)` receives one ("score", serve.score.Score), ("done", "cancelled") or ("error", message).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorakit.adapters.peft_files import AdapterFile

log = logging.getLogger("lorakit.serve")
MAX_WEIGHT = 10.0  # |stack weight| the engine accepts


@dataclass
class AdapterUse:
    key: str  # what a slot holds: the version's content hash, so a re-added name never reuses stale weights
    load: Callable[[], AdapterFile]
    weight: float = 1.0
    label: str = ""  # "name@version", for /health and logs (default: the key)
    rank: int = 0  # its largest module rank where known before loading (the registry's record), else 0


@dataclass
class MixtureUse:
    """A mixture of LoRAs (adapters/mixtures.py): the request's `adapters` are its K adapters in gate order
    (weight 1), and each adapted layer weights them per token with this router's gates."""
    key: str  # the mixture version's content hash
    load: Callable[[], object]  # -> adapters.mixtures.MixtureFile
    label: str = ""  # "mix:name@version"


@dataclass
class GenRequest:
    prompt: list[int]
    adapters: list[AdapterUse] = field(default_factory=list)  # empty: the base model; several: a weighted stack
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always produce max_tokens
    mixture: MixtureUse | None = None  # set: `adapters` are gated per token by this mixture's router
    sink: Callable[[tuple], None] = lambda ev: None
    cancelled: bool = False
    submitted: float = 0.0  # time.perf_counter() when the engine took it (Engine.submit)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class ScoreRequest:
    """Score `answer` after `prompt` under an adapter (or stack, or mixture) and under the base: one forward over
    the same tokens for both, giving per answer token KL(adapter || base) and both log-probs (serve/score.py)."""
    prompt: list[int]
    answer: list[int]
    adapters: list[AdapterUse] = field(default_factory=list)  # empty: the base scored against itself
    mixture: MixtureUse | None = None
    sink: Callable[[tuple], None] = lambda ev: None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def check_score(req: ScoreRequest, max_len: int, vocab_size: int) -> None:
    """What the engine needs of a scoring request: token ids in the vocabulary, prompt + answer in the context."""
    for what, ids in (("prompt", req.prompt), ("answer", req.answer)):
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"the {what} must be a non-empty list of token ids below {vocab_size}")
    if len(req.prompt) + len(req.answer) > max_len:
        raise ValueError(f"prompt ({len(req.prompt)} tokens) + answer ({len(req.answer)} tokens) exceeds the "
                         f"model's context of {max_len}")
    _check_stack(req)


def check_request(req: GenRequest) -> None:
    """What the engine needs of a request (the HTTP layer checks the same with friendlier messages)."""
    if not req.prompt or not all(isinstance(t, int) and t >= 0 for t in req.prompt):
        raise ValueError("the prompt must be a non-empty list of token ids")
    if not (isinstance(req.max_tokens, int) and req.max_tokens >= 1):
        raise ValueError(f"max_tokens must be a positive integer, got {req.max_tokens!r}")
    if not (math.isfinite(req.temperature) and req.temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {req.temperature!r}")
    if not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p!r}")
    _check_stack(req)


def _check_stack(req: GenRequest | ScoreRequest) -> None:
    if req.mixture is not None and len(req.adapters) < 2:
        raise ValueError(f"mixture {req.mixture.label or req.mixture.key!r} needs its adapters (at least two)")
    size: dict[str, float] = {}
    for a in req.adapters:
        if not (math.isfinite(a.weight) and abs(a.weight) <= MAX_WEIGHT):
            raise ValueError(f"stack weight {a.weight!r} of {a.label or a.key!r} must be finite and at most "
                             f"{MAX_WEIGHT:g} in size")
        size[a.key] = size.get(a.key, 0.0) + abs(a.weight)
        if size[a.key] > MAX_WEIGHT:  # one adapter version used twice: its weights add up in the slot
            raise ValueError(f"stack weights of {a.label or a.key!r} (used more than once) sum to {size[a.key]:g} "
                             f"in size; the limit is {MAX_WEIGHT:g} per adapter version")


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from logits (vocab,) at `temperature`, keeping the smallest top-p nucleus. Computed in
    float64 from logits minus their maximum, so any temperature > 0 (1e-45 included) gives finite
    probabilities: the arguments of exp are <= 0, a tiny temperature sends all but the maxima to -inf."""
    x = logits.double().cpu()
    probs = torch.softmax((x - x.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def send(req: GenRequest | ScoreRequest, ev: tuple) -> bool:
    """Deliver an event; a sink that raises (its client's loop is gone, a bug in a caller) cancels its
    request and nothing else. False if it raised."""
    try:
        req.sink(ev)
        return True
    except Exception:  # noqa: BLE001 - one request's receiver, never the batch's problem
        log.exception("could not deliver %s to a request; cancelling it", ev[0])
        req.cancel()
        return False
