"""LoRA for Conv1d/Conv2d (diffusion U-Nets, audio) and Embedding layers, in PEFT's layout.

Conv:       y = conv(x, W) + s * conv1x1(conv(x, A), B)      A (r, in, *k), B (out, r, *1)
            merged: W += s * (B_flat @ A_flat).view(W.shape)   (B_flat (out, r), A_flat (r, in*prod(k)))
Embedding:  y = W[ids] + s * A.T[ids] @ B.T                   A (r, num_embeddings), B (dim, r)
            merged: W += s * (B @ A).T                          (PEFT keys .lora_embedding_A / _B, no .weight)

Both are `LoraLinear` with the low-rank path swapped (four small methods), so activation, stacking,
merge/unmerge and saving are the same code as for linear layers. Like PEFT, conv A starts Kaiming-uniform
and B zero; embedding A starts zero and B normal. DoRA and routing hooks are linear-only here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.config import LoraConfig
from lorakit.core.layer import LoraLinear, LoraPair


class LoraConv(LoraLinear):
    """A frozen nn.Conv1d / nn.Conv2d plus named low-rank adapters."""

    kind = "conv"

    def __init__(self, base: nn.Conv1d | nn.Conv2d):
        super().__init__(base)
        self._proto = (base,)  # hyper-parameters (stride, padding, ...); a tuple keeps it out of the state dict
        self.kernel_size = tuple(base.kernel_size)

    @staticmethod
    def shape_of(base) -> tuple[int, int]:
        return base.out_channels, base.in_channels

    @classmethod
    def check_config(cls, base: nn.Module, config: LoraConfig, path: str) -> None:
        if config.use_dora:
            raise ValueError(f"DoRA on conv module {path!r} is not supported by lorakit; set use_dora=False "
                             f"or target only linear modules")
        base = base._proto[0] if isinstance(base, LoraConv) else base
        bad = {"groups": (base.groups, 1), "dilation": (tuple(base.dilation), (1,) * len(base.dilation)),
               "padding_mode": (base.padding_mode, "zeros")}
        for key, (got, want) in bad.items():
            if got != want:
                raise ValueError(f"conv module {path!r} has {key}={got!r}; LoRA on conv supports {key}={want!r} "
                                 f"only (the PEFT layout has no place for it)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            raise ValueError("routing hooks (per-row serving, mixtures) apply to linear layers only, "
                             "not to a conv adapter")
        return super().forward(x)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._proto[0]._conv_forward(x, self.weight, self.bias)

    def new_pair(self, r, alpha, dropout, use_rslora, init_b_zero, dtype, device) -> LoraPair:
        k = math.prod(self.kernel_size)
        pair = LoraPair(self.in_features * k, self.out_features, r, alpha, dropout, use_rslora, init_b_zero,
                        dtype=dtype, device=device)  # Kaiming fan-in in*k, as nn.Conv (and PEFT) use
        ones = (1,) * len(self.kernel_size)
        pair.lora_A = nn.Parameter(pair.lora_A.detach().reshape(r, self.in_features, *self.kernel_size))
        pair.lora_B = nn.Parameter(pair.lora_B.detach().reshape(self.out_features, r, *ones))
        return pair

    def lora_forward(self, p: LoraPair, xd: torch.Tensor) -> torch.Tensor:
        base = self._proto[0]
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        h = conv(xd, p.lora_A, None, base.stride, base.padding)  # (b, r, *spatial_out)
        return conv(h, p.lora_B)  # (b, out, *spatial_out)

    def delta_weight(self, p: LoraPair, weight: float = 1.0) -> torch.Tensor:
        d = p.lora_B.float().flatten(1) @ p.lora_A.float().flatten(1)  # (out, in*prod(k))
        return d.view(self.weight.shape) * (p.scale * weight)

    def to_base(self) -> nn.Module:
        base = self._proto[0]
        base.weight, base.bias = self.weight, self.bias
        return base


class LoraEmbedding(LoraLinear):
    """A frozen nn.Embedding plus named low-rank adapters (PEFT's lora_embedding_A/B)."""

    kind = "embedding"

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self._proto = (base,)

    @staticmethod
    def shape_of(base) -> tuple[int, int]:
        return base.embedding_dim, base.num_embeddings

    @classmethod
    def check_config(cls, base: nn.Module, config: LoraConfig, path: str) -> None:
        if config.use_dora:
            raise ValueError(f"DoRA on embedding module {path!r} is not supported by lorakit; set use_dora=False")

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b = self._proto[0]
        return F.embedding(ids, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _embed_scale(self):
        return getattr(self._proto[0], "embed_scale", None)  # e.g. Gemma's scaled embeddings

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self._embed(ids, self.weight)
        scale = self._embed_scale()
        return y if scale is None else y * scale.to(y.dtype)

    def new_pair(self, r, alpha, dropout, use_rslora, init_b_zero, dtype, device) -> LoraPair:
        pair = LoraPair(self.in_features, self.out_features, r, alpha, 0.0, use_rslora, True,
                        dtype=dtype, device=device)
        with torch.no_grad():  # PEFT's embedding init: A zero, B normal (init_lora_weights=False: both random)
            if init_b_zero:
                pair.lora_A.zero_()
            else:
                nn.init.normal_(pair.lora_A)
            nn.init.normal_(pair.lora_B)
        return pair

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(ids)
        if self.routing is not None:
            raise ValueError("routing hooks (per-row serving, mixtures) apply to linear layers only, "
                             "not to an embedding adapter")
        merged = {m[0] for m in self.merged}
        scale = self._embed_scale()
        for name, w in self.active.items():
            if name in merged or name not in self.adapters:
                continue
            p = self.adapters[name]
            h = self._embed(ids, p.lora_A.T)  # (..., r)
            lora = (h @ p.lora_B.T) * (p.scale * w)  # (..., dim)
            y = y + (lora if scale is None else lora * scale.to(lora.dtype)).to(y.dtype)
        return y

    def delta_weight(self, p: LoraPair, weight: float = 1.0) -> torch.Tensor:
        return p.delta(weight).T  # (num_embeddings, dim)

    def to_base(self) -> nn.Module:
        base = self._proto[0]
        base.weight = self.weight
        return base


WRAPPERS: dict[type, type[LoraLinear]] = {nn.Conv1d: LoraConv, nn.Conv2d: LoraConv, nn.Embedding: LoraEmbedding}
