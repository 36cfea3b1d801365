"""The LoRA layer: `LoraLinear` (one or more named adapters around a frozen linear) and `LoraPair`.

y = W x + b + sum_k w_k * s_k * B_k A_k dropout(x)       s = alpha / r   (rsLoRA: alpha / sqrt(r))

`LoraLinear` is composition around a frozen nn.Linear: it takes over the linear's own `weight` and
`bias` Parameters, so the model's state-dict names for the base weights do not change. Each layer
can hold several named adapters; a model-level set of *active* adapters (with weights) decides
which ones run. DoRA (magnitude vector + direction) is a per-adapter option.

A model-level `routing` hook lets serving (per-row adapter index) and mixtures of LoRAs (per-token
gates) replace the sum above without touching the layer code; see `lorakit.kernels`.
The functions that put layers into a model and take them out are in `lorakit.core.inject`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.config import LoraConfig, lora_scale

# A routing hook: (layer, x, base output) -> delta to add to the base output (same shape as the output). The base
# output (bias included) is there for what scales it: a DoRA adapter's magnitude (serve/slots.py).
Routing = Callable[["LoraLinear", torch.Tensor, torch.Tensor], torch.Tensor]


class LoraPair(nn.Module):
    """One adapter on one linear layer: A (r, in), B (out, r), optional DoRA magnitude (out,)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool = False, init_b_zero: bool = True, dtype=None, device=None):
        super().__init__()
        self.r, self.alpha, self.init_b_zero = r, float(alpha), init_b_zero
        self.scale = lora_scale(self.alpha, r, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) use for A
        if not init_b_zero:
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, weight: float = 1.0) -> torch.Tensor:
        """The full weight change s*w*B@A in float32, (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * (self.scale * weight)


class LoraLinear(nn.Module):
    """A frozen linear layer plus any number of named low-rank adapters."""

    kind = "linear"  # "all-linear" selects layers of this kind; conv_embedding.py adds "conv" and "embedding"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.out_features, self.in_features = self.shape_of(base)
        self.weight = base.weight  # same Parameter objects: names and sharing unchanged
        self.bias = getattr(base, "bias", None)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # name -> weight; insertion order is application order
        self.merged: list[tuple[str, float, torch.Tensor | None]] = []  # (name, weight, DoRA gain g) in order
        # the base weight as it was before the first merge (a buffer: moves with .to(), not in state_dict)
        self.register_buffer("original", None, persistent=False)
        self.routing: Routing | None = None
        self.tied_with: list[str] = []  # other modules that share this weight (set by add_adapter)

    @staticmethod
    def shape_of(base: nn.Module) -> tuple[int, int]:
        """(out, in) of the module this class wraps."""
        return base.out_features, base.in_features

    @classmethod
    def check_config(cls, base: nn.Module, config: LoraConfig, path: str) -> None:
        """Raise ValueError if `config` cannot be applied to module `base` at `path` (before anything changes)."""

    # ---- base path (a quantized base overrides these two; conv/embedding override base_forward) ----
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def base_weight(self) -> torch.Tensor:
        """The (dequantized) base weight, (out, in)."""
        return self.weight

    # ---- the low-rank path (conv/embedding override these three) ----
    def new_pair(self, r: int, alpha: float, dropout: float, use_rslora: bool, init_b_zero: bool,
                 dtype, device) -> "LoraPair":
        return LoraPair(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init_b_zero,
                        dtype=dtype, device=device)

    def lora_forward(self, p: "LoraPair", xd: torch.Tensor) -> torch.Tensor:
        """B A xd without the scale, (..., out)."""
        return F.linear(F.linear(xd, p.lora_A), p.lora_B)

    def delta_weight(self, p: "LoraPair", weight: float = 1.0) -> torch.Tensor:
        """s*w*B@A in float32, in the base weight's shape."""
        return p.delta(weight)

    def to_base(self) -> nn.Module:
        """The plain module again (adapters dropped; call after unmerge or merge as wanted)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    # ---- adapters ----
    def add(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
            init_b_zero: bool = True, dtype=None) -> LoraPair:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base_weight()
        pair = self.new_pair(r, alpha, dropout, use_rslora, init_b_zero,
                             dtype=dtype or (w.dtype if w.is_floating_point() else torch.float32), device=w.device)
        if use_dora:
            with torch.no_grad():
                norm = self._dora_norm(self._pristine_weight(), self.delta_weight(pair))
            pair.lora_magnitude_vector = nn.Parameter(norm.to(pair.lora_A.dtype))
        self.adapters[name] = pair
        return pair

    def _dora_norm(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(w.float() + delta, dim=1)  # (out,) row norms of W + dW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = y = self.base_forward(x)
        if self.routing is not None:
            return y + self.routing(self, x, y)
        merged = {m[0] for m in self.merged}
        for name, w in self.active.items():
            if name in merged or name not in self.adapters:
                continue
            p = self.adapters[name]
            xd = p.dropout(x).to(p.lora_A.dtype)
            if p.lora_magnitude_vector is None and type(self).lora_forward is LoraLinear.lora_forward:
                y = self._add_low_rank(y, p, xd, p.scale * w)
                continue
            lora = self.lora_forward(p, xd) * (p.scale * w)  # (..., out)
            if p.lora_magnitude_vector is None:
                y = y + lora.to(y.dtype)
            else:
                y = y + self._dora_extra(p, w, xd, y0, lora).to(y.dtype)
        return y

    @staticmethod
    def _add_low_rank(y: torch.Tensor, p: "LoraPair", xd: torch.Tensor, scale: float) -> torch.Tensor:
        """y + scale B A xd, with the scale on the narrow (..., r) tensor and the add inside the B matmul (one
        GEMM with a beta term): no full-width multiply or add pass, forward or backward."""
        h = F.linear(xd, p.lora_A) * scale                              # (..., r)
        if h.dtype != y.dtype or y.dim() < 2:
            return y + F.linear(h, p.lora_B).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), p.lora_B.t())  # (n, out)
        return out.view(y.shape)

    def _dora_extra(self, p: LoraPair, w: float, xd, y0, lora) -> torch.Tensor:
        """DoRA: alone, an adapter makes W' = m * (W + dW) / ||W + dW||_row, the norm detached (DoRA paper,
        section 4.3). Stacked with weight w, relative to the frozen base W (never to another adapter):
        W + w (W' - W), so the extra over the base output is w (g - 1) W xd + g w dW xd, g = m / ||W + dW||.
        At w = 1 this is PEFT's DoRA; unlike PEFT, several DoRA adapters add up independently of their order
        and merge exactly."""
        weight = self._pristine_weight()
        with torch.no_grad():
            norm = self._dora_norm(weight, self.delta_weight(p))
        g = (p.lora_magnitude_vector / norm.to(p.lora_magnitude_vector.dtype))  # (out,)
        if isinstance(p.dropout, nn.Identity) and not self.merged:
            base = y0 if self.bias is None else y0 - self.bias  # W x, already computed
        else:
            base = F.linear(xd.to(weight.dtype), weight)
        return (g - 1) * base.to(g.dtype) * w + g * lora

    # ---- merge / unmerge ----
    # With merged adapters k (weight w_k, DoRA gain g_k or none), the stored weight is
    #   W = W0 * (1 + sum_dora w_k (g_k - 1))[:, None] + sum_k w_k g_k dW_k        (g_k = 1 for plain LoRA)
    # which is exactly what forward() computes unmerged, and which can be solved for the pristine W0.
    @torch.no_grad()
    def _merge_terms(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(row scale (out,) or None when no DoRA adapter is merged, additive term in the weight's shape)"""
        scale, add = None, torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        for name, w, g in self.merged:
            d = self.delta_weight(self.adapters[name], w)
            if g is None:
                add += d
            else:
                scale = (1.0 if scale is None else scale) + w * (g - 1)
                add += g[:, None] * d
        return scale, add

    @torch.no_grad()
    def _pristine_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter: the kept copy when there is one, else solved from
        the merged weight (float32; off by the merged weight's dtype rounding)."""
        W = self.base_weight()
        if not self.merged:
            return W
        if self.original is not None:
            return self.original
        scale, add = self._merge_terms(W)
        W0 = W.float() - add
        return W0 if scale is None else W0 / scale[:, None]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, keep_original: bool = True) -> None:
        """Fold active adapters (or `names`) into the base weight. Idempotent; the merged layer computes
        what the unmerged one does (DoRA included, several adapters included). The sum W0 + dW is formed
        in float32 and rounded to the weight's dtype once. `keep_original` keeps a copy of the base
        weight (its dtype, its device) so that unmerge restores it bit for bit; without it unmerge
        solves for W0 from the rounded merged weight (in bf16 off by up to one rounding step,
        2^-8 relative)."""
        if self.tied_with:
            raise ValueError(f"this layer's weight is shared with {self.tied_with} (tied weights): merging "
                             f"would change those modules too; use the adapter unmerged")
        done = {m[0] for m in self.merged}
        todo = [n for n in (names if names is not None else list(self.active))
                if n not in done and n in self.adapters]
        if not todo:
            return
        W0 = self._pristine_weight().float()
        before = len(self.merged)
        for name in todo:
            p = self.adapters[name]
            g = None
            if p.lora_magnitude_vector is not None:
                g = p.lora_magnitude_vector.float() / self._dora_norm(W0, self.delta_weight(p))  # (out,)
            self.merged.append((name, self.active.get(name, 1.0), g))
        scale, add = self._merge_terms(W0)
        new = ((W0 if scale is None else W0 * scale[:, None]) + add).to(self.weight.dtype)
        if not torch.isfinite(new).all():
            del self.merged[before:]
            raise ValueError(f"merging {todo} would put non-finite values (inf/NaN) in a {tuple(new.shape)} "
                             f"{self.weight.dtype} weight; nothing was changed")
        if before == 0 and keep_original:
            self.original = self.weight.detach().clone()
        self.weight.data.copy_(new)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge: bit for bit from the kept copy, else up to the weight dtype's rounding."""
        if self.merged:
            W0 = self._pristine_weight()
            self.merged.clear()
            self.weight.data.copy_(W0.to(self.weight.dtype))
            self.original = None

    def extra_repr(self) -> str:
        ranks = {n: p.r for n, p in self.adapters.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active}"
