"""The training loop's text data as numbered micro-batches (`MicroBatches`, the `MicroBatchSource` of
train/backends.py for token rows): micro-batch m is the same rows every time, whatever process asks and whenever,
so a resumed run or another rank sees exactly what the uninterrupted single process would have."""
from __future__ import annotations

import math
import random

import torch

from lorakit import faults
from lorakit.train import packing
from lorakit.train.data import IGNORE, Example, collate


class MicroBatches:
    """Micro-batch number m -> the same batch every time (epoch order seeded by (seed, epoch)).

    group_by_length: each epoch's shuffled order is cut into windows of `window` optimizer batches (`unit` rows:
    batch size x accumulation steps); each window is sorted by length and its batches are shuffled again. Rows of a
    batch then have similar lengths, so little compute goes to padding, the epoch order stays random at the scale
    of windows, and an optimizer step sees the same rows however it is split into micro-batches.

    With `world` ranks a micro-batch is global (batch_size x world rows) and `get` returns rank `rank`'s share;
    a rank left without rows (a short last micro-batch) gets one row with no target."""
    count = staticmethod(lambda batch: int((batch["labels"][:, 1:] != IGNORE).sum()))  # a batch's target tokens

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 group_by_length: bool = False, window: int = 32, unit: int | None = None,
                 rank: int = 0, world: int = 1, pack: bool = False):
        self.pack, self.widths = pack, None  # packed rows (train/packing.py); the allowed packed widths
        self.examples, self.bs, self.seed, self.pad = examples, batch_size * world, seed, pad_id
        self.group, self.window, self.unit = group_by_length, window, unit or batch_size * world
        self.rank, self.world = rank, world
        self.per_epoch = math.ceil(len(examples) / self.bs)
        self.targets = [sum(lab != IGNORE for lab in e.labels[1:]) for e in examples]
        self.lengths = [len(e.input_ids) for e in examples]
        self._rand = random.Random
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            rng = self._rand(self.seed * 100_003 + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.group:
                span = self.unit * self.window
                grouped = []
                for w in range(0, len(order), span):
                    part = sorted(order[w:w + span], key=lambda j: len(self.examples[j].input_ids))
                    chunks = [part[i:i + self.unit] for i in range(0, len(part), self.unit)]
                    rng.shuffle(chunks)
                    grouped += [j for c in chunks for j in c]
                order = grouped
            self._orders = {epoch: order}
        return self._orders[epoch]

    def indices(self, m: int) -> list[int]:
        """The rows of global micro-batch m."""
        epoch, i = divmod(m, self.per_epoch)
        return self.order(epoch)[i * self.bs:(i + 1) * self.bs]

    def part(self, m: int) -> list[int]:  # this rank's rows of micro-batch m
        idx = self.indices(m)
        return idx[self.rank * len(idx) // self.world:(self.rank + 1) * len(idx) // self.world]

    def get(self, m: int) -> dict[str, torch.Tensor]:
        faults.point("train.micro_batch", m)
        part = self.part(m)
        rows = [self.examples[j] for j in part or self.indices(m)[:1]]
        batch = packing.micro_batch(rows, self.pad, self.widths) if self.pack else collate(rows, self.pad)
        if not part:
            batch["labels"].fill_(IGNORE)
        return batch


def trim_to_targets(examples: list[Example]) -> list[Example]:
    """Drop the tokens after each row's last target token: nothing is predicted from them."""
    out = []
    for e in examples:
        last = max((i for i, lab in enumerate(e.labels) if lab != IGNORE), default=len(e.labels) - 1)
        out.append(e if last == len(e.labels) - 1 else Example(e.input_ids[:last + 1], e.labels[:last + 1]))
    return out
