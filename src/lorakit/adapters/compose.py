"""Combine adapters into one ordinary adapter (PEFT layout): linear, cat, svd, ties, dare.

Each input adapter k contributes, per module, the weight change w_k * s_k * B_k A_k (its scale s_k =
alpha/r or alpha/sqrt(r) folded in). A module one adapter lacks has a zero change there.

  linear  the exact weighted sum of the changes. Its exact low-rank form is the rank concatenation
          below, so linear and cat write the same file (ranks add up). PEFT's "linear" mixes A and B
          separately, which adds cross terms w_i w_j B_i A_j: not the weighted sum.
  cat     A = [A_1; A_2; ...] (sum r, in), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] / s (out, sum r): exact.
  svd     the exact sum, truncated to `rank` by SVD (computed from the factors: QR of the stacked B and A,
          then the SVD of a small sum-r square matrix); the relative Frobenius error is reported.
  ties    TIES-merging on the full changes: keep each adapter's top `density` fraction by magnitude, elect
          the sign of the sum per entry, average the entries that agree; then SVD to `rank`.
  dare    DARE: drop each entry with probability 1 - density (seeded), rescale by 1/density, weighted sum;
          then SVD to `rank`.

The output has one alpha: per-module scales are folded into B. Conv A (r, in, *k) is flattened to
(r, in*prod(k)) for the algebra and reshaped back; embeddings keep their lora_embedding_A/B keys.
DoRA adapters are refused: their weight change depends on the base weights, which composition never sees.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.version import __version__
from lorakit.adapters.peft_files import CONFIG_NAME, EMBEDDING_SUFFIXES, PREFIX, WEIGHTS_NAME, AdapterFile, read_adapter
from lorakit.config import COMPOSE_METHODS, LoraConfig
from lorakit.files import atomic_write_dir

METHODS = COMPOSE_METHODS


@dataclass
class Factor:
    """One adapter's change on one module: B (out, r) @ A (r, in_flat), scale and weight folded into B."""
    B: torch.Tensor
    A: torch.Tensor
    embedding: bool
    a_shape: tuple  # A's shape in the file (conv: (r, in, *k))


@dataclass
class Composed:
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    report: dict
    fingerprint: dict | None = None
    sources: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the composed adapter in the PEFT layout (temp dir + rename)."""
        from safetensors.torch import save_file

        header = {"format": "pt", "lorakit.version": __version__,
                  "lorakit.metadata": json.dumps({"composed": self.report})}
        if self.fingerprint is not None:
            header["lorakit.base_fingerprint"] = json.dumps(self.fingerprint)
        peft_cfg = self.config.to_peft(self.report.get("base_model_name_or_path"),
                                       self.report.get("task_type", "CAUSAL_LM"))  # a UNet's adapters: None

        def write(tmp: Path):
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2))
            save_file(self.tensors, str(tmp / WEIGHTS_NAME), metadata=header)

        atomic_write_dir(Path(path), write)
        return Path(path)


# ---------------------------------------------------------------- inputs
def check_weight(weight, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight for adapter {name!r} must be a finite number, got {weight!r}")
    return float(weight)


def parse_spec(spec: str) -> tuple[str, float]:
    """'path:0.7' -> ('path', 0.7); 'path' -> ('path', 1.0)."""
    path, sep, w = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        raise ValueError(f"weight {w!r} for adapter {path!r} is not a number; expected PATH:WEIGHT, "
                         f"e.g. {path}:0.5") from None
    return path, check_weight(weight, path)


def _factors(af: AdapterFile, weight: float) -> dict[str, Factor]:
    cfg = af.config
    if cfg.use_dora or any(k.endswith(".lora_magnitude_vector") for k in af.tensors):
        raise ValueError(f"adapter {str(af.path)!r} uses DoRA: its weight change depends on the base weights, "
                         f"which composition does not see; merge it into a base instead")
    out = {}
    embed = {k.removeprefix(PREFIX)[:-len(s)] for k in af.tensors for s in EMBEDDING_SUFFIXES if k.endswith(s)}
    for path, t in af.modules().items():
        A, B = t["lora_A"].float(), t["lora_B"].float()
        r = A.shape[0]
        scale = cfg.scale_for(path, r=r)
        out[path] = Factor(B.reshape(B.shape[0], r) * (scale * weight), A.reshape(r, -1), path in embed,
                           tuple(A.shape))
    return out


ALLOW = "pass --allow-base-mismatch to compose them anyway"


def base_key(name: str | None) -> str | None:
    """A base's name as two tools may write it, reduced to the model's own name: 'SmolLM2-135M-Instruct',
    '/root/.cache/lorakit/SmolLM2-135M-Instruct', 'HuggingFaceTB/SmolLM2-135M-Instruct' and a hub cache
    path '.../models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/<sha>' all give 'smollm2-135m-instruct'."""
    if not name:
        return None
    parts = [p for p in re.split(r"[\\/]", str(name)) if p]
    hub = next((p for p in reversed(parts) if p.startswith("models--")), None)
    last = hub.split("--")[-1] if hub else (parts[-1] if parts else str(name))
    return re.sub(r"\.gguf$", "", last).lower()


def check_same_base(files: list[AdapterFile], allow_base_mismatch: bool = False) -> None:
    """Refuse adapters made for different bases. Module shapes must agree always (so a PEFT file, which has
    no fingerprint, is checked by its shapes); where both adapters carry lorakit's base fingerprint, the
    architecture and shape hash must agree and, unless allowed, the weight hash (names are then ignored: one
    base goes by many names). Where neither has a fingerprint, the base names (reduced by `base_key`) must
    agree unless allowed."""
    first = files[0]
    seen: dict[str, tuple[tuple, str]] = {}  # module -> (shape, adapter)
    for af in files:
        for path, t in af.modules().items():
            shape = (t["lora_B"].shape[0], *t["lora_A"].shape[1:])
            if path in seen and seen[path][0] != shape:
                raise ValueError(f"adapters are for different bases: module {path!r} is (out, in, ...)={shape} in "
                                 f"{str(af.path)!r} but {seen[path][0]} in {seen[path][1]!r}")
            seen.setdefault(path, (shape, str(af.path)))
    fps = [(af, af.fingerprint) for af in files if af.fingerprint]
    for af, b in fps[1:]:
        ref, a = fps[0]
        for key in ("architecture", "shape_hash"):
            if a.get(key) != b.get(key):
                raise ValueError(f"adapters are for different bases: {key} is {a.get(key)!r} "
                                 f"(hidden {a.get('hidden_size')}) in {str(ref.path)!r} but {b.get(key)!r} "
                                 f"(hidden {b.get('hidden_size')}) in {str(af.path)!r}")
        if a.get("weight_hash") != b.get("weight_hash") and not allow_base_mismatch:
            raise ValueError(f"adapters {str(ref.path)!r} and {str(af.path)!r} were trained on bases of the "
                             f"same shape but different weights (weight_hash {a.get('weight_hash')} vs "
                             f"{b.get('weight_hash')}: e.g. base vs instruct, or a 4-bit base); {ALLOW}")
    if fps or allow_base_mismatch:
        return
    for af in files[1:]:
        na, nb = first.peft_config.get("base_model_name_or_path"), af.peft_config.get("base_model_name_or_path")
        if na and nb and base_key(na) != base_key(nb):
            raise ValueError(f"adapters name different bases: {na!r} ({str(first.path)!r}) vs {nb!r} "
                             f"({str(af.path)!r}) and carry no weight fingerprint to tell; {ALLOW}")


# ---------------------------------------------------------------- the methods, per module
# Each returns (B (out, R), A (R, in), |target - B A|_F, |target|_F); target = the change the method defines.
def _cat(fs: list[Factor], **_):
    return torch.cat([f.B for f in fs], dim=1), torch.cat([f.A for f in fs], dim=0), 0.0, 0.0  # exact


def _truncate(U, S, Vh, rank: int):
    k = min(rank, S.numel())
    root = S[:k].sqrt()  # split the singular values evenly between B and A
    dropped, total = S[k:].square().sum().sqrt().item(), S.square().sum().sqrt().item()
    return U[:, :k] * root, root[:, None] * Vh[:k], dropped, total


def _svd(fs: list[Factor], rank: int, **_):
    B, A, _, _ = _cat(fs)  # the exact sum is B @ A; factor it without forming (out, in)
    qb, rb = torch.linalg.qr(B)  # (out, R), (R, R)
    qa, ra = torch.linalg.qr(A.T)  # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(rb @ ra.T)  # small (R, R)
    return _truncate(qb @ U, S, Vh @ qa.T, rank)


def _dense(fs: list[Factor]) -> torch.Tensor:
    return torch.stack([f.B @ f.A for f in fs])  # (k, out, in), weights and scales included


def _refactor(delta: torch.Tensor, rank: int):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(U, S, Vh, rank)


def _ties(fs: list[Factor], rank: int, density: float, **_):
    tau = _dense(fs)  # (k, out, in)
    flat = tau.flatten(1)  # (k, n)
    keep = max(1, math.ceil(density * flat.shape[1]))
    idx = flat.abs().topk(keep, dim=1).indices
    trimmed = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))  # top-density entries per adapter
    sign = trimmed.sum(0).sign()  # (n,) elected sign
    agree = (trimmed.sign() == sign) & (trimmed != 0)  # (k, n)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    return _refactor(merged.view(tau.shape[1:]), rank)


def _dare(fs: list[Factor], rank: int, density: float, generator: torch.Generator, **_):
    tau = _dense(fs)  # (k, out, in)
    mask = torch.rand(tau.shape, generator=generator) < density
    return _refactor((tau * mask).sum(0) / density, rank)


MERGERS = {"linear": _cat, "cat": _cat, "svd": _svd, "ties": _ties, "dare": _dare}


# ---------------------------------------------------------------- compose
def compose(adapters: list[tuple[str | Path, float]], method: str = "linear", *, rank: int | None = None,
            density: float = 0.5, seed: int = 0, allow_base_mismatch: bool = False) -> Composed:
    """Combine [(adapter dir, weight), ...] into one adapter. Nothing is written: call `.save(path)`."""
    if method not in MERGERS:
        raise ValueError(f"unknown compose method {method!r}; expected one of {list(METHODS)}")
    if not adapters:
        raise ValueError("compose needs at least one adapter")
    weights = [check_weight(w, str(p)) for p, w in adapters]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if method in ("ties", "dare") and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    files = [read_adapter(p) for p, _ in adapters]
    check_same_base(files, allow_base_mismatch)
    factors = [_factors(af, w) for af, w in zip(files, weights)]
    rank = rank or max(t["lora_A"].shape[0] for af in files for t in af.modules().values())
    gen = torch.Generator().manual_seed(seed)
    parts, errors = {}, {}
    for path in sorted({p for f in factors for p in f}):
        fs = [f[path] for f in factors if path in f]
        B, A, err, norm = MERGERS[method](fs, rank=rank, density=density, generator=gen)
        parts[path] = (B, A, fs[0])
        errors[path] = (err, norm)
    return _assemble(files, weights, parts, errors, method, rank, density, seed)


def _assemble(files, weights, parts, errors, method, rank, density, seed) -> Composed:
    ranks = {p: B.shape[1] for p, (B, _, _) in parts.items()}
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    # one alpha for the output: alpha = r_default, so s = 1 where r = r_default; B carries the rest
    tensors = {}
    dtype = files[0].tensors[next(iter(files[0].tensors))].dtype
    if any(t.dtype != dtype for af in files for t in af.tensors.values()):
        dtype = torch.float32
    for path, (B, A, like) in parts.items():
        r = ranks[path]
        B = B * (r / r_default)  # fold 1/s, s = r_default / r
        A = A.reshape(r, *like.a_shape[1:])
        B = B.reshape(B.shape[0], r, *([1] * (len(like.a_shape) - 2)))
        suffixes = ((".lora_embedding_A", ".lora_embedding_B") if like.embedding
                    else (".lora_A.weight", ".lora_B.weight"))
        tensors[PREFIX + path + suffixes[0]] = A.to(dtype).contiguous()
        tensors[PREFIX + path + suffixes[1]] = B.to(dtype).contiguous()
    config = LoraConfig(r=r_default, alpha=float(r_default), dropout=files[0].config.dropout, targets=sorted(parts),
                        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r_default},
                        alpha_pattern={})
    rel = {p: (e / n if n > 0 else 0.0) for p, (e, n) in errors.items()}
    total = sum(n ** 2 for _, n in errors.values())
    overall = (sum(e ** 2 for e, _ in errors.values()) / total) ** 0.5 if total > 0 else 0.0
    report = {"method": method, "sources": [{"path": str(af.path), "weight": w} for af, w in zip(files, weights)],
              "modules": len(parts), "rank": r_default, "max_rank": max(ranks.values()),
              "rel_error_overall": overall, "rel_error_max": max(rel.values()), "rel_error": rel,
              "base_model_name_or_path": files[0].peft_config.get("base_model_name_or_path"),
              "task_type": files[0].peft_config.get("task_type", "CAUSAL_LM")}
    if method in ("svd", "ties", "dare"):
        report["target_rank"] = rank
    if method in ("ties", "dare"):
        report["density"] = density
    if method == "dare":
        report["seed"] = seed
    fp = next((af.fingerprint for af in files if af.fingerprint), None)
    if fp is not None:
        shapes = {}
        for af in files:
            shapes.update((af.fingerprint or {}).get("shapes", {}))
        fp = {**fp, "shapes": {p: s for p, s in shapes.items() if p in parts}}
    return Composed(config, tensors, report, fp, [str(af.path) for af in files])


# ---------------------------------------------------------------- CLI
