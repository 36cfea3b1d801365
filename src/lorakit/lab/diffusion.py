"""The parts of the diffusion demo (`lorakit diffusion-demo`, lab/diffusion_demo.py): scikit-learn's 8x8
digits (as they come, or upscaled), a small diffusers UNet2DModel, its noise schedule, a DDIM sampler, the base
model trained (or read from its cache) through the one training loop, a digit classifier that labels samples,
and a PNG grid.

Needs `pip install lorakit[diffusion]` (diffusers, scikit-learn) and matplotlib for the grid.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.config import TrainConfig
from lorakit.lab.diffusion_options import SIZE, BaseSpec
from lorakit.files import atomic_write_dir

log = logging.getLogger("lorakit.lab")

OLD_DIGITS, NEW_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
# conv layers of the resnet blocks + the attention projections: what LoRA for image models usually adapts
UNET_TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "diffusion"


def digits(classes=OLD_DIGITS, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits of `classes` -> (images (n, 1, size, size) in [-1, 1], labels (n,))."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = torch.tensor([int(y) in classes for y in d.target])
    x = torch.tensor(d.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0 * 2 - 1  # (n, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, torch.tensor(d.target)[keep]


def tiny_unet(size: int = SIZE, channels: tuple[int, ...] = (16, 32), attention: bool = True):
    """A small diffusers UNet2DModel (random init): one resnet a level, one attention block (the middle, at
    size/2), group norm of 8 groups."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * len(channels),
                       up_block_types=("UpBlock2D",) * len(channels), add_attention=attention,
                       attention_head_dim=channels[-1], norm_num_groups=8)


def scheduler():
    """The noise schedule of training and sampling: DDPM, 1000 steps, cosine betas (better than linear on
    small images)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@torch.no_grad()
def sample(unet, n: int, *, steps: int = 40, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """`n` DDIM samples (eta 0: deterministic given the seed) -> (n, 1, s, s) in [-1, 1]. The same seed starts
    from the same noise, so samples of the base and of the adapted model are comparable one to one."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler().config)
    ddim.set_timesteps(steps)
    s = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, unet.config.in_channels, s, s, generator=g)
    was = unet.training
    unet.eval()
    out = []
    for i in range(0, n, batch_size):
        xi = x[i:i + batch_size]
        for t in ddim.timesteps:
            eps = unet(xi, t).sample
            xi = ddim.step(eps, t, xi, eta=0.0).prev_sample
        out.append(xi.clamp(-1, 1))
    unet.train(was)
    return torch.cat(out)


# ---------------------------------------------------------------- the base model
def load_unet(path: str | Path):
    from diffusers import UNet2DModel

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers model directory (no config.json)")
    return UNet2DModel.from_pretrained(str(path))


def base_unet(spec: BaseSpec | None = None, *, threads: int = 0, progress: bool = True,
              root: Path | None = None) -> tuple[object, Path, dict]:
    """The base UNet for `spec`: read from the cache (diffusers files: config.json +
    diffusion_pytorch_model.safetensors) or trained on digits 0-4 and cached. -> (unet, dir, info)."""
    from lorakit.train.diffusion import DiffusionBackend
    from lorakit.train.loop import train

    spec = spec or BaseSpec()
    path = (root or cache_dir()) / spec.key()
    if (path / "config.json").exists():
        info = json.loads((path / "base_info.json").read_text()) if (path / "base_info.json").exists() else {}
        log.info("base UNet from the cache: %s", path)
        return load_unet(path), path, {**info, "cached": True}
    torch.manual_seed(spec.seed)
    unet = tiny_unet(spec.size, spec.channels)
    images, _ = digits(OLD_DIGITS, spec.size)
    cfg = TrainConfig(lr=spec.lr, max_steps=spec.steps, batch_size=spec.batch_size, warmup_ratio=0.02,
                      full=True, seed=spec.seed, threads=threads, weight_decay=0.0)
    holder: dict = {}

    def write(tmp: Path) -> None:
        res = train(unet, None, images, tmp, cfg=cfg, backend=DiffusionBackend(unet, scheduler()),
                    progress=progress)
        holder.update(seconds=round(res.seconds, 1), steps=res.steps, first_loss=res.losses[0],
                      final_loss=sum(res.losses[-20:]) / len(res.losses[-20:]), images=len(images),
                      params=res.total, spec={**spec.__dict__, "channels": list(spec.channels)})
        (tmp / "base_info.json").write_text(json.dumps(holder, indent=2))

    atomic_write_dir(path, write)  # a killed run leaves no half-written cache
    log.info("base UNet trained in %.0f s, cached in %s", holder["seconds"], path)
    return unet.eval(), path, {**holder, "cached": False}


# ---------------------------------------------------------------- the judge
class DigitClassifier:
    """An SVM on the digits at `size` (all ten classes; 20% held out for its accuracy) that labels samples."""

    def __init__(self, size: int = SIZE, seed: int = 0):
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        x, y = digits(tuple(range(10)), size)
        xtr, xte, ytr, yte = train_test_split(x.flatten(1).numpy(), y.numpy(), test_size=0.2, random_state=seed,
                                              stratify=y.numpy())
        self.svm = SVC(gamma="scale", C=10.0).fit(xtr, ytr)
        self.accuracy = float((self.svm.predict(xte) == yte).mean())

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.svm.predict(images.flatten(1).float().numpy()))

    def shares(self, images: torch.Tensor, classes=NEW_DIGITS) -> dict:
        """Share of samples labelled one of `classes`, and the count of each label."""
        lab = self.labels(images)
        counts = torch.bincount(lab, minlength=10).tolist()
        return {"new_share": round(sum(counts[c] for c in classes) / max(len(lab), 1), 4), "counts": counts}


# ---------------------------------------------------------------- the picture
def save_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path, labels: list[torch.Tensor] | None = None,
              title: str | None = None) -> Path:
    """One row of images per (name, images (k, 1, s, s) in [-1, 1]) -> a PNG; `labels` writes the classifier's
    digit over each image."""
    from lorakit.lab.plots import pyplot, save_figure

    plt = pyplot()
    k = max(len(x) for _, x in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(0.62 * k + 1.6, 0.8 * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(imgs):
                ax.imshow(((imgs[j, 0] + 1) / 2).numpy(), cmap="gray_r", vmin=0, vmax=1)
                if labels is not None and labels[i] is not None:
                    ax.set_title(str(int(labels[i][j])), fontsize=7, pad=1)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, Path(path))
