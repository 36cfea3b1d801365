"""Mixture of LoRAs: K frozen adapters and a small trained router that gates them per token.

    y = W x + b + sum_k g_k(x) * s_k B_k A_k x,      g(x) = softmax(R_l x / T)   (per token, per layer)

The router is one tiny linear map per adapted layer (in -> K), applied to the hidden state entering that
layer. Why per layer, on that layer's input: by then attention has mixed the context (e.g. the task
instruction) into every token, so the gate can depend on what the sequence is about, not just on the
token's identity (a single router on the embeddings sees only the token); it needs no state carried
between layers, so it fits the `LoraLinear.routing` hook as a plain (layer, x) -> delta function; and
different depths may prefer different adapters. It costs K * in parameters per layer (a few thousand).
The router starts at zero: every gate is 1/K, i.e. training starts from the uniform mix.

Only the router trains (`lorakit.train.router.train_router`, through the one training loop); the adapters and
the base stay frozen. DoRA adapters and conv/embedding layers are refused (the routed sum is the plain LoRA one).
`save` writes router.safetensors and router.json; the mixture artifact (the adapters' names and content hashes,
the base fingerprint, checked on load) is lorakit.adapters.mixtures.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.inject import LoraLinear, check_names, lora_layers, set_routing
from lorakit.files import atomic_write_file, atomic_write_json

ROUTER_FILE = "router.safetensors"
ROUTER_CONFIG = "router.json"


def gate_key(path: str) -> str:
    """The state-dict key of the gate of the layer at module path `path`: gates.<gate_key>.weight / .bias."""
    return path.replace(".", "__")


def gate_probs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(R rms(h) / T): h (..., in), weight (K, in), bias (K,) -> (..., K) float32 gates. The one formula
    the router (training, offline use) and the server (per token, per row) both run."""
    h = h.float()
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)  # (..., in)
    return torch.softmax(F.linear(h, weight, bias) / temperature, dim=-1)


class Router(nn.Module):
    """Per-layer softmax gates over the adapters `names`. Call `attach(model)` to route the model."""

    def __init__(self, model: nn.Module, names: list[str], temperature: float = 1.0):
        super().__init__()
        check_names(model, names)
        if len(names) < 2:
            raise ValueError(f"a mixture needs at least two adapters, got {names}")
        self.names, self.temperature = list(names), float(temperature)
        self.gates = nn.ModuleDict()
        self._layer_key: dict[int, str] = {}
        self.layer_paths: list[str] = []  # routed layers, in model order
        for path, layer in lora_layers(model):
            if not any(n in layer.adapters for n in names):
                continue
            if layer.kind != "linear":
                raise ValueError(f"mixtures route linear layers only; {path!r} is a {layer.kind} layer")
            for n in names:
                if n in layer.adapters and layer.adapters[n].lora_magnitude_vector is not None:
                    raise ValueError(f"adapter {n!r} uses DoRA on {path!r}; mixtures take plain LoRA adapters")
            w = layer.base_weight()
            gate = nn.Linear(layer.in_features, len(names), device=w.device, dtype=torch.float32)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            self.gates[gate_key(path)] = gate
            self._layer_key[id(layer)] = gate_key(path)
            self.layer_paths.append(path)

    def gate_values(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        """(..., K) softmax gates for the tokens x (..., in) entering `layer`. x is RMS-normalised first:
        hidden states of LLMs carry a few huge channels (and o_proj/down_proj inputs are not normalised at
        all), which would saturate the softmax at the first step and stop its gradient."""
        gate = self.gates[self._layer_key[id(layer)]]
        return gate_probs(x, gate.weight, gate.bias, self.temperature)

    def forward(self, layer: LoraLinear, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The routing hook: the gate-weighted sum of the adapters' outputs, (..., out)."""
        if id(layer) not in self._layer_key:
            return torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
        g = self.gate_values(layer, x)  # (..., K)
        out = None
        for k, name in enumerate(self.names):
            p = layer.adapters[name] if name in layer.adapters else None
            if p is None:
                continue
            d = layer.lora_forward(p, p.dropout(x).to(p.lora_A.dtype)).float() * p.scale  # (..., out)
            out = g[..., k:k + 1] * d if out is None else out + g[..., k:k + 1] * d
        return out.to(x.dtype)

    def attach(self, model: nn.Module) -> None:
        """Route every adapted layer of `model` through this router (detach: set_routing(model, None))."""
        set_routing(model, self.forward)  # a bound method: the router is not registered in the layers

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_file(path / ROUTER_FILE, lambda p: save_file(state, str(p)))
        atomic_write_json(path / ROUTER_CONFIG, {"adapters": self.names, "temperature": self.temperature,
                                                 "layers": self.layer_paths})
        return path

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> "Router":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ROUTER_FILE).exists():
            raise FileNotFoundError(f"no {ROUTER_FILE} in {str(path)!r}")
        cfg = json.loads((path / ROUTER_CONFIG).read_text())
        router = cls(model, cfg["adapters"], cfg["temperature"])
        router.load_tensors(load_file(str(path / ROUTER_FILE)), str(path))
        return router

    def load_tensors(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load gate tensors (as `save` writes them), refusing any that do not fit this model's routed layers."""
        want = self.state_dict()
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or extra:
            raise ValueError(f"router in {where!r} does not fit this model's adapted layers: missing "
                             f"{missing[:3]}, unexpected {extra[:3]}")
        for k, v in state.items():
            if v.shape != want[k].shape:
                raise ValueError(f"router in {where!r}: {k!r} is {tuple(v.shape)}, this model needs "
                                 f"{tuple(want[k].shape)}")
        self.load_state_dict(state)


def uniform_routing(names: list[str]):
    """The baseline a router starts from: every adapter at weight 1/K (same as set_active with 1/K each)."""
    w = 1.0 / len(names)
    return {n: w for n in names}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where labels != -100: logits (b, s, V), labels (b, s)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
