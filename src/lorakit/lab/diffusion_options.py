"""The diffusion demo's options (plain data, no torch: the command line builds its --help from them)."""
from __future__ import annotations

from dataclasses import dataclass, field

SIZE = 16  # scikit-learn's 8x8 digits upscaled (bilinear): smoother samples than at 8x8, for ~3x the time


@dataclass
class BaseSpec:
    """What the base is; the cache key. Trained on OLD_DIGITS with full training through the one loop."""
    channels: tuple[int, ...] = (16, 32)  # 164k parameters: trained in minutes on two cores
    size: int = SIZE
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return f"unet{self.size}-{'x'.join(map(str, self.channels))}-s{self.steps}-b{self.batch_size}-seed{self.seed}"


@dataclass
class DemoOptions:
    out: str = "diffusion-demo"
    base: BaseSpec = field(default_factory=BaseSpec)
    r: int = 8
    alpha: float = 16.0
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    samples: int = 256  # DDIM samples a model (labelled by the classifier)
    sample_steps: int = 30
    sweep_ranks: list[int] = field(default_factory=lambda: [1, 4, 16])
    sweep_full: bool = True
    full_lr: float = 5e-4
    threads: int = 0  # torch CPU threads (0: the cores this process may use)
    seed: int = 0
    cache: str | None = None  # base cache root (default ~/.cache/lorakit/diffusion)

    def validate(self) -> None:
        for k in ("r", "steps", "batch_size", "samples", "sample_steps"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)!r}")
        if any(r <= 0 for r in self.sweep_ranks):
            raise ValueError(f"sweep ranks must be positive integers, got {self.sweep_ranks}")
