"""Packed micro-batches for the training loop: a micro-batch's rows concatenated into one row with no padding
(train/data.py `pack`), each row keeping its own positions and attending only to itself (the backend's document
mask), so the loss and gradients are the padded batch's (tests/unit/test_packing.py).

A compiled backend sees one shape per packed width. Its widths come from the run's own micro-batches: every
micro-batch of the run is known before the first step, `data.choose_widths` picks at most a few widths that pad
the fewest tokens, and the backend compiles each one before the first step (`warm_up`): no step after it compiles.
"""
from __future__ import annotations

import logging
import time

import torch

from lorakit.train.data import Example, choose_widths, pack, width_for

log = logging.getLogger("lorakit.train")

MAX_SHAPES = 4  # packed widths a compiled run may see


def micro_batch(rows: list[Example], pad_id: int, widths: list[int] | None) -> dict[str, torch.Tensor]:
    """The rows packed into one row: exactly their tokens, or padded up to the smallest allowed width."""
    total = sum(len(e.input_ids) for e in rows)
    return pack(rows, pad_id, width_for(total, widths) if widths else None)


def setup(mb, backend, cfg, world: int, micro: range, pad_id: int) -> None:
    """Say whether rows are packed, and why not; a compiled backend gets its few widths, compiled up front.
    `mb`: the loop's MicroBatches (pack, part, indices, lengths, widths); `micro`: the run's micro-batch numbers."""
    if not hasattr(mb, "pack"):
        return
    if not mb.pack:
        why = "turned off (--no-pack)" if not cfg.pack else \
            getattr(backend, "pack_off", None) or f"the {backend.name} backend takes padded batches"
        log.info("packing: off (%s)", why)
        return
    if not getattr(backend, "bucketed", False):
        log.info("packing: on (rows concatenated, no padding)")
        return
    totals = [sum(mb.lengths[j] for j in (mb.part(m) or mb.indices(m)[:1])) for m in micro]
    mb.widths = choose_widths(totals, MAX_SHAPES)
    padded = sum(width_for(t, mb.widths) - t for t in totals)
    log.info("packing: on, packed widths %s (the compiled shapes; %.1f%% of tokens are padding)", mb.widths,
             100.0 * padded / max(1, padded + sum(totals)))
    if world == 1 and hasattr(backend, "warm_up"):
        t0 = time.perf_counter()
        backend.warm_up(mb.widths, pad_id, [sum(mb.targets[j] for j in mb.part(m)) for m in micro])
        log.info("compiled %d packed widths in %.1f s", len(mb.widths), time.perf_counter() - t0)
