"""Training a mixture-of-LoRAs router (core/mixture.py) through the one training loop: the base and the adapters
stay frozen, only the router's gates learn; same loss, optimizer set-up, schedule, checkpoints and metrics as
any other run."""
from __future__ import annotations

import tempfile
from pathlib import Path

from lorakit.config import TrainConfig
from lorakit.train.data import Example
from lorakit.train.loop import TrainResult, train


def train_router(model, router, examples: list[Example], out_dir: str | Path | None = None, *,
                 cfg: TrainConfig | None = None, tok=None, eval_examples: list[Example] | None = None,
                 resume: bool = False, progress: bool = False, metadata: dict | None = None) -> TrainResult:
    """Train `router` on `examples` (loss on their target tokens). With `out_dir`, the router files
    (router.safetensors, router.json), metrics.jsonl and checkpoints go there; without, nothing is kept.
    Defaults: lr 2e-3 (a higher rate saturates the normalised gates), no warm-up, backend plain."""
    cfg = cfg or TrainConfig(lr=2e-3, warmup_ratio=0.0)
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return train(model, tok, examples, tmp, cfg=cfg, eval_examples=eval_examples, progress=progress,
                         save_final=False, router=router)
    return train(model, tok, examples, out_dir, cfg=cfg, eval_examples=eval_examples, resume=resume,
                 progress=progress, metadata=metadata, router=router)
