"""Adapter memory slots: the resident adapters' A and B stacked per layer, with an LRU over adapters.

For every linear layer that some resident adapter targets:

    A (S, r, in)   B (S, out, r)        S = 1 + max_slots; slot 0 = no adapter (zeros); r: the layer's own

and one scale per slot (alpha / r of the adapter); the rare adapter whose scale differs between
layers (alpha_pattern / rank_pattern) has the ratio folded into those layers' B.

DoRA adapters share the batch with the others: a layer that some resident DoRA adapter adapts also holds
dora (S, out) float32, zero for plain slots, and a DoRA slot stores g-scaled B and (g - 1) / scale
(kernels.reference.dora_slot, g = magnitude / ||W + scale B A||_row computed once at load time); the layer's
base output W x (from the routing hook) scales it, so a row gets exactly its adapter's offline DoRA output.

Each layer's rank is zero-padded to the largest rank a resident adapter has on that layer (zero rows of A /
columns of B add exactly nothing), never above `max_rank` (--max-lora-rank: an adapter of a larger rank is
refused with the number), so memory is bounded by layers x S x max_rank x (in + out) and one high-rank adapter on
one layer grows that layer alone. Loading an adapter writes its tensors into a free slot (evicting the least
recently used unpinned adapter if none is free): the loader thread has already made the file into one host
buffer in the bank's dtype (`staged`), which reaches the device in one copy, then each tensor is copied on the
device; unloading zeroes what the slot's adapter wrote and gives memory back: each layer
shrinks to the largest rank still resident on it, a layer no resident adapter adapts is dropped. The base
weights are never written: each layer's output gets `kernels.lora_delta(x, A, B, idx, coef)` added through
`LoraLinear.routing`, with the per-row slot index and coefficients of the current batch.

Mixtures of LoRAs: a resident mixture is its router's gates, per layer (K, in) and (K,), beside the slots of
its K adapters. A row that runs a mixture names those K slots; at each layer the gates of that row's tokens
are computed from the layer's input (core.mixture.gate_probs, as offline) and its coefficients become per
token, coef (b, s, k), for that layer's lora_delta. Rows of other kinds in the batch keep their (slot, coef).
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from lorakit import kernels
from lorakit.adapters.peft_files import AdapterFile, validate_adapter
from lorakit.adapters.mixtures import MixtureFile, check_base
from lorakit.core.inject import LoraLinear, get_parent
from lorakit.core.mixture import gate_probs
from lorakit.kernels.reference import dora_slot
from lorakit.serve.staging import Prepared, adapter_scales, routing_table, staged, view_of


@dataclass
class LayerSlots:
    A: torch.Tensor  # (S, r, in)
    B: torch.Tensor  # (S, out, r), times scale_here / slot_scale where an adapter's scale varies by layer
    path: str = ""
    dora: torch.Tensor | None = None  # (S, out) float32 once a DoRA adapter adapts this layer, else None


@dataclass
class ResidentMixture:
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (weight (K, in), bias (K,)) float32
    temperature: float
    k: int
    pins: int = 0


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter that a running request uses."""


MAX_RANK = 64  # the default --max-lora-rank


class SlotBank:
    def __init__(self, model: nn.Module, max_slots: int, base_fp: dict, max_rank: int = MAX_RANK):
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        self.model, self.max_slots, self.base_fp, self.max_rank = model, max_slots, base_fp, max_rank
        w = next(model.parameters())
        self.dtype = w.dtype if w.is_floating_point() else torch.float32
        self.device = w.device
        self.layers: dict[str, LayerSlots] = {}
        self._by_module: dict[nn.Module, LayerSlots] = {}
        self.slot_layers: dict[int, dict[str, tuple[int, bool]]] = {}  # slot -> layer path -> (rank, DoRA)
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recent first
        self.pins = [0] * (max_slots + 1)
        self.slot_scale = torch.zeros(max_slots + 1, dtype=torch.float32)
        self.idx: torch.Tensor | None = None  # (b, k) of the batch being run
        self.coef: torch.Tensor | None = None  # (b, k): stack weight x the slot's scale
        self.mixtures: OrderedDict[str, ResidentMixture] = OrderedDict()  # mixture key -> gates, LRU first
        self._mix_rows: list[tuple[ResidentMixture, torch.Tensor]] = []  # the batch's mixture rows, per mixture
        self._routing_on = False

    # ---------------------------------------------------------------- residency
    def prepare(self, af: AdapterFile) -> Prepared:
        """An adapter file checked (validate_adapter against the base, the rank cap) and made into what `acquire`
        writes into a slot (`Prepared`). Reads only what never changes after start-up (the base's fingerprint, the
        rank cap, the bank's dtype and device), so the loader thread runs it, off the engine thread."""
        mods = adapter_scales(self._checked(af))
        self.check_rank(mods)
        return staged(mods, self.dtype)

    def acquire(self, key: str, load) -> int:
        """The slot holding adapter `key`, loading it if needed (`load()` -> an AdapterFile, checked here, or the
        modules `prepare` made of one on the loader thread); pins it."""
        if key in self.resident:
            self.resident.move_to_end(key)
        else:
            got = load()
            prep = got if isinstance(got, Prepared) else self.prepare(got)
            slot = self._free_slot()
            self._write(slot, prep)
            self.resident[key] = slot
        slot = self.resident[key]
        self.pins[slot] += 1
        return slot

    def check_rank(self, mods: dict) -> None:
        path, (A, *_) = max(mods.items(), key=lambda kv: kv[1][0].shape[0])
        if A.shape[0] > self.max_rank:
            raise ValueError(f"the adapter has rank {A.shape[0]} (module {path!r}); this server holds adapters of "
                             f"rank at most {self.max_rank} (--max-lora-rank)")

    def release(self, slot: int) -> None:
        if slot:
            self.pins[slot] -= 1

    def can_acquire(self, keys: list[str]) -> bool:
        missing = sum(k not in self.resident for k in set(keys))
        free = self.max_slots - len(self.resident) + sum(self.pins[s] == 0 for k, s in self.resident.items()
                                                         if k not in keys)
        return missing <= free

    def acquire_mixture(self, key: str, load) -> None:
        """Make mixture `key`'s gates resident (`load()` -> MixtureFile, checked against the base and the
        layers) and pin them; call after its adapters' slots are acquired (their layers then exist)."""
        if key not in self.mixtures:
            mf: MixtureFile = load()
            check_base(mf, self.base_fp)
            gates = {}
            for path, (w, b) in mf.gates().items():
                ls = self.layers.get(path)
                if ls is None or ls.A.shape[2] != w.shape[1]:
                    raise ValueError(f"mixture {str(mf.path)!r}: its gate for {path!r} (in {w.shape[1]}) fits no "
                                     "layer its adapters adapt")
                gates[path] = (w.to(self.device), b.to(self.device))
            self.mixtures[key] = ResidentMixture(gates, mf.temperature, len(mf.names))
            spare = [k for k, m in self.mixtures.items() if m.pins == 0 and k != key]  # least recent first
            for old in spare[:max(0, len(self.mixtures) - self.max_slots)]:
                del self.mixtures[old]  # gates are small: keep as many mixtures as adapter slots
        self.mixtures.move_to_end(key)
        self.mixtures[key].pins += 1

    def release_mixture(self, key: str) -> None:
        if key in self.mixtures:
            self.mixtures[key].pins -= 1

    def unload(self, key: str) -> bool:
        """Drop adapter or mixture `key` from memory if no running request uses it. True if it was unloaded."""
        if key in self.mixtures:
            if self.mixtures[key].pins:
                return False
            del self.mixtures[key]
            return True
        slot = self.resident.get(key)
        if slot is None or self.pins[slot]:
            return False
        self._zero(slot)
        del self.resident[key]
        self._shrink()
        return True

    def _free_slot(self) -> int:
        used = set(self.resident.values())
        for s in range(1, self.max_slots + 1):
            if s not in used:
                return s
        for key, s in self.resident.items():  # least recently used first
            if self.pins[s] == 0:
                self.unload(key)
                return s
        raise NoFreeSlot(f"all {self.max_slots} adapter slots are in use by running requests")

    def _checked(self, af: AdapterFile) -> AdapterFile:
        validate_adapter(af, self.base_fp)  # the same checks as registry add and load_adapter
        return af

    # ---------------------------------------------------------------- tensors
    def _layer(self, path: str, r: int) -> LayerSlots:
        """The bank of layer `path`, created (wrapping the layer) or grown to hold rank `r`."""
        if path in self.layers:
            ls = self.layers[path]
            pad = r - ls.A.shape[1]
            if pad > 0:
                ls.A = torch.cat([ls.A, ls.A.new_zeros(ls.A.shape[0], pad, ls.A.shape[2])], dim=1)
                ls.B = torch.cat([ls.B, ls.B.new_zeros(ls.B.shape[0], ls.B.shape[1], pad)], dim=2)
        else:
            mod = self.model.get_submodule(path)
            if not isinstance(mod, LoraLinear):
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"module {path!r} is a {type(mod).__name__}, not a linear layer")
                parent, child = get_parent(self.model, path)
                mod = LoraLinear(mod)  # shares the base weight: nothing is copied or changed
                setattr(parent, child, mod)
            S = self.max_slots + 1
            ls = LayerSlots(torch.zeros(S, r, mod.in_features, dtype=self.dtype, device=self.device),
                            torch.zeros(S, mod.out_features, r, dtype=self.dtype, device=self.device), path)
            self.layers[path], self._by_module[mod] = ls, ls
            mod.routing = self._route if self._routing_on else None
        return self.layers[path]

    def _shrink(self) -> None:
        """Give back what no resident adapter needs: each layer down to its largest resident rank, a layer that
        none adapts (or a DoRA buffer no resident DoRA adapter uses) dropped; freed memory returned to the OS."""
        need: dict[str, tuple[int, bool]] = {}
        for slot in self.resident.values():
            for path, (r, dora) in self.slot_layers.get(slot, {}).items():
                r0, d0 = need.get(path, (0, False))
                need[path] = (max(r0, r), d0 or dora)
        freed = False
        for path in list(self.layers):
            ls = self.layers[path]
            r, dora = need.get(path, (0, False))
            if r == 0:
                mod = self.model.get_submodule(path)
                mod.routing = None
                del self.layers[path], self._by_module[mod]
                freed = True
                continue
            if r < ls.A.shape[1]:
                ls.A, ls.B = ls.A[:, :r].clone(), ls.B[:, :, :r].clone()
                freed = True
            if ls.dora is not None and not dora:
                ls.dora, freed = None, True
        if freed and self.device.type == "cpu":
            _trim_heap()

    @torch.no_grad()
    def _write(self, slot: int, prep: Prepared) -> None:
        """The prepared adapter into `slot` (zeroed first where its last adapter wrote: see `_zero`). Plain
        modules: their host buffer reaches the device in one copy (one wait of the engine thread, where a copy
        per tensor was one wait each), then every tensor is copied on the device from its view of it, in one
        call (torch._foreach_copy_). DoRA modules' slots are computed on the device from the base weight."""
        mods = prep.mods
        dev_buf = None if prep.buf is None else prep.buf.to(self.device)
        for path, m in mods.items():
            self._layer(path, m[0].shape[0])
        self._zero(slot)
        self.slot_layers[slot] = {path: (m[0].shape[0], m[3] is not None) for path, m in mods.items()}
        dst, src = [], []  # plain modules: every copy in one call
        for path, (A, B, scale, magnitude) in mods.items():
            ls, r = self.layers[path], A.shape[0]
            if magnitude is None:  # staged: B already carries scale / prep.common
                dst += [ls.A[slot, :r], ls.B[slot, :, :r]]
                src += [view_of(dev_buf, A), view_of(dev_buf, B)]
                continue
            layer = self.model.get_submodule(path)
            W = layer.base_weight()
            B_slot, d = dora_slot(W, A.to(W.device), B.to(W.device), magnitude.to(W.device), scale, prep.common)
            ls.A[slot, :r].copy_(A)
            ls.B[slot, :, :r].copy_(B_slot)
            if ls.dora is None:
                ls.dora = torch.zeros(self.max_slots + 1, B.shape[0], dtype=torch.float32, device=self.device)
            ls.dora[slot].copy_(d)
        if dst:
            torch._foreach_copy_(dst, src)
        self.slot_scale[slot] = prep.common

    @torch.no_grad()
    def _zero(self, slot: int) -> None:
        """Zero what the slot's last adapter wrote (`slot_layers`): every other part of a slot is zero already
        (banks are made of zeros, grown with zeros, and only `_write` writes, recording where)."""
        parts = []
        for path in self.slot_layers.pop(slot, {}):
            ls = self.layers.get(path)
            if ls is None:  # dropped by _shrink: nothing of it left
                continue
            parts += [ls.A[slot], ls.B[slot]] + ([ls.dora[slot]] if ls.dora is not None else [])
        if parts:
            torch._foreach_zero_(parts)
        self.slot_scale[slot] = 0.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ls in self.layers.values() for t in (ls.A, ls.B, ls.dora)
                   if t is not None)

    # ---------------------------------------------------------------- per-batch routing
    def set_batch(self, idx: torch.Tensor, coef: torch.Tensor, mixtures: list[str | None] | None = None) -> None:
        """idx (b, k) slot per row (0 = base), coef (b, k) stack weights; mixtures: per row the resident mixture
        whose gates weight that row's first K slots per token (None: a plain row). Rows of slot 0 only: no
        routing."""
        coef = coef.float() * self.slot_scale[idx]  # (b, k), once per step for every layer
        self.idx, self.coef = idx.to(self.device), coef.to(self.device)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(mixtures or []):
            if key is not None:
                groups.setdefault(key, []).append(i)
        self._mix_rows = [(self.mixtures[k], torch.tensor(rows, device=self.device)) for k, rows in groups.items()]
        on = bool((idx != 0).any())
        if on != self._routing_on:
            for mod in self._by_module:
                mod.routing = self._route if on else None
            self._routing_on = on

    def batch(self, rows: list[tuple[list[int], list[float], str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx (b, k) long, coef (b, k) float32 = stack weight x the slot's scale) on the CPU from each row's
        (slots, stack weights, mixture key or None); padding entries are slot 0 with coefficient 0."""
        idx, coef = routing_table(rows)
        return idx, coef * self.slot_scale[idx]

    def set_rows(self, rows: list[tuple[list[int], list[float], str | None]]) -> None:
        """set_batch from each row's (slots, stack weights, mixture key or None)."""
        self.set_batch(*routing_table(rows), [mix for _, _, mix in rows])

    def bind(self, idx: torch.Tensor | None, coef: torch.Tensor | None) -> None:
        """Route every adapted layer with these device tensors as they are (idx (b, k), coef (b, k) already
        scaled, as `batch` gives them), or turn routing off (None): a CUDA graph captured now reads whatever
        the caller later writes into them. No mixture rows."""
        self.idx, self.coef, self._mix_rows = idx, coef, []
        on = idx is not None
        if on != self._routing_on:
            for mod in self._by_module:
                mod.routing = self._route if on else None
            self._routing_on = on

    def layout(self) -> tuple:
        """What a captured graph depends on: the adapted layers and the addresses of their slot tensors (a new
        layer or a rank growth reallocates them)."""
        return tuple((p, ls.A.data_ptr(), ls.B.data_ptr(), None if ls.dora is None else ls.dora.data_ptr())
                     for p, ls in self.layers.items())

    def project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """layer(x) with the batch's adapters; for a plain adapted layer (no DoRA slot, no mixture rows) the
        adapters' output is added into the base output in place (kernels.lora_add: no separate add)."""
        ls = self._by_module.get(layer) if self._routing_on and not self._mix_rows else None
        if ls is None or ls.dora is not None:
            return layer(x)
        y = layer.base_forward(x)
        x3, y3 = (x, y) if x.dim() == 3 else (x.unsqueeze(1), y.unsqueeze(1))
        kernels.lora_add(y3, x3, ls.A, ls.B, self.idx, self.coef)
        return y

    def project_group(self, layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """[layer(x) for layer in layers] with the batch's adapters, for projections of one input x (b, 1, in) (a
        decode step): the plain adapted ones through one grouped kernel pair (kernels.lora_add_group), the
        others (DoRA slots, no slots, mixture rows, several tokens a row) as `project` runs them."""
        on = self._routing_on and not self._mix_rows and x.dim() == 3 and x.shape[1] == 1
        lss = [self._by_module.get(m) if on else None for m in layers]
        plain = [i for i, ls in enumerate(lss) if ls is not None and ls.dora is None]
        if len(plain) < 2:
            return [self.project(m, x) for m in layers]
        ys = [layers[i].base_forward(x) if i in plain else self.project(layers[i], x) for i in range(len(layers))]
        kernels.lora_add_group([ys[i] for i in plain], x, [lss[i].A for i in plain],
                               [lss[i].B for i in plain], self.idx, self.coef)
        return ys

    def _route(self, layer: LoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ls = self._by_module[layer]
        x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (b, s, in)
        coef = self._token_coef(ls, x3) if self._mix_rows else self.coef
        if ls.dora is None:
            delta = kernels.lora_delta(x3, ls.A, ls.B, self.idx, coef)  # (b, s, out)
        else:  # W x: the base output without its bias
            wx = y if layer.bias is None else y - layer.bias.to(y.dtype)
            delta = kernels.lora_delta(x3, ls.A, ls.B, self.idx, coef, dora=ls.dora,
                                       base=wx if wx.dim() == 3 else wx.unsqueeze(1))
        return delta if x.dim() == 3 else delta.squeeze(1)

    def _token_coef(self, ls: LayerSlots, x3: torch.Tensor) -> torch.Tensor:
        """(b, s, k) coefficients: each row's (b, k) ones, except that mixture rows get their gates (computed
        from this layer's input x3 (b, s, in) for those rows only) times their slots' scales."""
        b, s, k = x3.shape[0], x3.shape[1], self.coef.shape[1]
        coef = self.coef[:, None, :].expand(b, s, k).clone()  # (b, s, k)
        for mix, rows in self._mix_rows:
            gate = mix.gates.get(ls.path)
            if gate is None:  # none of this mixture's adapters adapts this layer
                coef[rows] = 0.0
                continue
            g = gate_probs(x3.index_select(0, rows), gate[0], gate[1], mix.temperature)  # (n, s, K)
            coef[rows, :, :mix.k] = g * self.coef[rows, None, :mix.k]  # gate x the slot's alpha / r
        return coef


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps freed blocks below its mmap threshold otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
