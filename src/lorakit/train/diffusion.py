"""A backend of the one training loop (train/loop.py) for diffusion models: the DDPM noise-prediction loss.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps        (the scheduler's add_noise)
    loss = sum over images of mean_pixels (eps_theta(x_t, t) - eps)^2 / denom

`denom` is the number of images in the whole accumulated batch, so gradient accumulation equals a bigger batch,
as for text. The model is any module called as `model(x_t, t).sample` (a diffusers UNet2DModel) or returning
the prediction itself; the scheduler any object with `add_noise(x0, noise, t)` and `config.num_train_timesteps`
(a diffusers DDPMScheduler). Nothing here imports diffusers.

Training data is a tensor of images (n, c, h, w) in [-1, 1]. Micro-batch m is the same every time: the epoch
order is seeded by (seed, epoch), and each image's noise and timestep by (seed, epoch, image), so a resumed run
draws what the uninterrupted one drew and gradient accumulation equals a bigger batch.
The loop's `tokens` count images with this backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class ImageBatches:
    """Micro-batch number m -> {"images" (b, c, h, w), "noise" (b, c, h, w), "timesteps" (b,)}: the loop's
    micro-batch protocol (backends.MicroBatchSource, as train/batches.py's MicroBatches: per_epoch, indices, get,
    targets, lengths, count), where an image is one target and one item."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, num_timesteps: int):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (n, c, h, w), got {tuple(images.shape)} "
                             f"{images.dtype}")
        self.images, self.bs, self.seed, self.T = images, batch_size, seed, num_timesteps
        self.per_epoch = math.ceil(len(images) / batch_size)
        self.targets = self.lengths = [1] * len(images)
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.images), generator=g))
        return self._order[1]

    def indices(self, m: int) -> list[int]:
        epoch, i = divmod(m, self.per_epoch)
        return self.order(epoch)[i * self.bs:(i + 1) * self.bs].tolist()

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return len(batch["images"])

    def get(self, m: int) -> dict[str, torch.Tensor]:
        epoch = m // self.per_epoch
        idx = self.indices(m)
        x0 = self.images[idx]  # (b, c, h, w)
        noise, t = [], []
        for j in idx:  # drawn per (epoch, image): a batch split into micro-batches draws the same
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + j)
            noise.append(torch.randn(x0.shape[1:], generator=g))
            t.append(int(torch.randint(0, self.T, (1,), generator=g)))
        return {"images": x0, "noise": torch.stack(noise).to(x0.dtype), "timesteps": torch.tensor(t)}


class DiffusionBackend:
    """The DDPM epsilon-prediction loss for `train(..., backend=DiffusionBackend(unet, scheduler))`."""

    name = "ddpm"

    def __init__(self, model: nn.Module, scheduler=None):
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler()
        kind = getattr(scheduler.config, "prediction_type", "epsilon")
        if kind != "epsilon":
            raise ValueError(f"the DDPM backend trains noise prediction; the scheduler has prediction_type={kind!r}, "
                             f"expected 'epsilon'")
        self.model, self.scheduler = model, scheduler
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    def micro_batches(self, images: torch.Tensor, cfg, rank: int = 0, world: int = 1) -> ImageBatches:
        if world != 1:
            raise ValueError(f"the {self.name!r} backend trains in one process, not {world} (torchrun); "
                             "run it without torchrun")
        return ImageBatches(images, cfg.batch_size, cfg.seed, self.num_timesteps)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t)
        return out.sample if hasattr(out, "sample") else out

    def loss(self, batch: dict[str, torch.Tensor], denom: float) -> tuple[torch.Tensor, int]:
        x0, noise, t = batch["images"], batch["noise"], batch["timesteps"]
        dtype = next(self.model.parameters()).dtype
        xt = self.scheduler.add_noise(x0.float(), noise.float(), t).to(dtype)  # (b, c, h, w)
        pred = self.predict(xt, t)
        per_image = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)  # (b,)
        return per_image.sum() / denom, len(x0)

    def close(self) -> None:
        pass

