"""Configuration dataclasses. Plain data only: no behaviour beyond validation and (de)serialisation.

Unknown keys are errors everywhere: a typo in a config must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ALL_LINEAR = "all-linear"
# Preset target sets a user can name instead of listing modules.
TARGET_PRESETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qv": ["q_proj", "v_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    ALL_LINEAR: ALL_LINEAR,
}
# how `lorakit compose` combines adapters (adapters/compose.py implements them; named here for the CLI's --help)
COMPOSE_METHODS = ("linear", "cat", "svd", "ties", "dare")


MAX_PATTERN_KEYS = 4096  # rank_pattern / alpha_pattern keys (a lorakit or compose file writes one per module)
MAX_PATTERN_CHARS = 512  # characters in one key
PATTERN_SECONDS = 5.0  # a file's patterns are matched against its module paths within this time (patterns.py)


def pattern_regex(key: str) -> str:
    """PEFT's rule: a rank_pattern / alpha_pattern key matches the end of a module path (whole dotted segments)."""
    return rf"(.*\.)?({key})$"


def check_pattern(field_name: str, key: object) -> None:
    """A pattern key is a string of at most MAX_PATTERN_CHARS that compiles; ValueError naming the field if not."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{field_name} keys must be non-empty strings, got {key!r}")
    if len(key) > MAX_PATTERN_CHARS:
        raise ValueError(f"{field_name} key of {len(key)} characters; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        re.compile(key)  # its own error positions first
        re.compile(pattern_regex(key))
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{field_name} key {key!r} is not a valid regular expression: {e}") from None


def match_pattern(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches the end of module path
    `path` (a regex over whole dotted segments), else `default`. Runs the regexes here: a file from elsewhere is
    matched through lorakit.patterns (a time limit), and its results kept in LoraConfig.resolved."""
    for key, val in patterns.items():
        if re.match(pattern_regex(key), path):
            return val
    return default


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B A: alpha / r (rsLoRA: alpha / sqrt(r))."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class _FromDict:
    """to_dict/from_dict for the config dataclasses; an unknown key is an error that lists the known ones."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass
class LoraConfig(_FromDict):
    """One adapter's shape. `targets` is a list of module names (suffix match), a regex string
    (full match on the module path), or "all-linear" (every nn.Linear except the output head)."""

    # lorakit's defaults: every linear layer at r=16 (on the demo task all-linear beats attention-only at every rank,
    # docs/sweep/report.md). PEFT's own defaults (r=8, alpha=8, q_proj/v_proj) are `LoraConfig.peft_defaults()`.
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    init_lora_weights: bool = True  # False: B random too (a test helper: makes a fresh adapter non-trivial)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got r={self.r!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            keys = getattr(self, name)
            if len(keys) > MAX_PATTERN_KEYS:
                raise ValueError(f"{name} has {len(keys)} keys; at most {MAX_PATTERN_KEYS} are accepted")
            for k in keys:
                check_pattern(name, k)
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        if not _positive_number(self.alpha):
            raise ValueError(f"alpha must be a finite positive number, got alpha={self.alpha!r}")
        for k, v in self.alpha_pattern.items():
            if not _positive_number(v):
                raise ValueError(f"alpha_pattern[{k!r}] must be a finite positive number, got {v!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = TARGET_PRESETS.get(self.targets, self.targets)
        if isinstance(self.targets, (list, tuple)):
            self.targets = list(self.targets)
            if not self.targets:
                raise ValueError("targets is empty; name at least one module, a regex, or 'all-linear'")

    # ---- PEFT adapter_config.json ----
    @classmethod
    def peft_defaults(cls, **overrides) -> "LoraConfig":
        """HF PEFT's defaults for a Llama model: r=8, lora_alpha=8, dropout 0, target_modules q_proj and v_proj."""
        return cls(**{"r": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"], **overrides})

    # module path -> (rank, alpha) where the patterns were matched ahead of use (lorakit.patterns.resolve: an
    # adapter file's module paths, at read or registry-add time), so serving never runs a pattern's regex.
    # Not a dataclass field: never saved, compared or copied with the config.
    resolved = None  # dict[str, tuple[int, float]] | None; unannotated, so not a dataclass field

    def rank_for(self, path: str) -> int:
        """The rank of module `path` (rank_pattern, else r)."""
        if self.resolved is not None and path in self.resolved:
            return self.resolved[path][0]
        return int(match_pattern(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """The alpha of module `path` (alpha_pattern, else alpha)."""
        if self.resolved is not None and path in self.resolved:
            return self.resolved[path][1]
        return float(match_pattern(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str, r: int | None = None) -> float:
        """The factor on module `path`'s B A: its alpha over its rank (rsLoRA: over the rank's square root).
        `r`: the rank the module's tensors actually have, where a file is read (default: rank_for(path))."""
        return lora_scale(self.alpha_for(path), self.rank_for(path) if r is None else r, self.use_rslora)

    def to_peft(self, base_model_name_or_path: str | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
        """The adapter_config.json PEFT reads. Only PEFT's own keys: lorakit metadata lives elsewhere.
        task_type None: a model that is not a causal LM (a diffusion UNet); PEFT then wraps it in a plain PeftModel."""
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": True,
            "modules_to_save": self.modules_to_save or None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": False,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type {d.get('peft_type')!r} is not supported; expected 'LORA'")
        if d.get("bias", "none") != "none":
            raise ValueError(f"bias={d.get('bias')!r} adapters are not supported; expected 'none'")
        if d.get("fan_in_fan_out"):
            raise ValueError("fan_in_fan_out=True (GPT-2 Conv1D) adapters are not supported")
        targets = d.get("target_modules")
        if targets is None:
            raise ValueError("adapter_config.json has no target_modules")
        if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"target_modules must be a string or a list of strings, got {targets!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(d.get(key) or {}, dict):
                raise ValueError(f"{key} must be an object, got {d.get(key)!r}")
        for key in ("use_rslora", "use_dora"):
            if not isinstance(d.get(key) or False, bool):
                raise ValueError(f"{key} must be true or false, got {d.get(key)!r}")
        if not isinstance(d.get("modules_to_save") or [], list):
            raise ValueError(f"modules_to_save must be a list, got {d.get('modules_to_save')!r}")
        return cls(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0) or 0.0,
            targets=targets if isinstance(targets, str) else list(targets),
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
            modules_to_save=list(d.get("modules_to_save") or []),
        )


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class TrainConfig(_FromDict):
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_len: int = 512
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end
    log_every: int = 1
    full: bool = False  # full fine-tuning instead of LoRA
    backend: str = "auto"  # auto | plain | fast (train/backends.py)
    recompute: int | str = 0  # layers whose activations are recomputed in backward: 0, N, or "all"
    group_by_length: bool = True  # batches of rows of similar length (less padding)
    fused_mlp: bool = False  # fast backend: SwiGLU + MLP LoRA kernels (less memory, a little slower; docs/gpu.md)
    share_prefix: bool = True  # plain backend: the leading tokens all rows of a batch share run once
    pack: bool = True  # rows of a micro-batch concatenated (no padding), attention kept within each row
    threads: int = 0  # torch CPU threads; 0 = the cores this process may use (shared among a node's ranks)
    parallel: str = "auto"  # under torchrun: auto | ddp | fsdp (train/distributed.py); ignored in one process
    offload: str = "none"  # fsdp: none | params (sharded weights, grads and AdamW state in host memory; train/fsdp.py)
    adapter_state: str = "shard"  # fsdp: shard | replicate (adapters and their AdamW state whole on every rank)
    # compiled layers: the share of the saved activations torch.compile's partitioner may keep (1.0: all it
    # would; lower: it recomputes cheap ops in backward instead). torch._functorch.config, for this run only
    activation_memory_budget: float = 1.0

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.backend not in ("auto", "plain", "fast"):
            raise ValueError(f"backend must be auto, plain or fast, got {self.backend!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if self.offload not in ("none", "params"):
            raise ValueError(f"offload must be none or params, got {self.offload!r}")
        if self.adapter_state not in ("shard", "replicate"):
            raise ValueError(f"adapter_state must be shard or replicate, got {self.adapter_state!r}")
        if not 0 < self.activation_memory_budget <= 1:
            raise ValueError(f"activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}")
        if isinstance(self.recompute, str) and self.recompute != "all":
            if not self.recompute.isdigit():
                raise ValueError(f"recompute must be a number of layers or 'all', got {self.recompute!r}")
            self.recompute = int(self.recompute)
        if isinstance(self.recompute, bool) or (isinstance(self.recompute, int) and self.recompute < 0):
            raise ValueError(f"recompute must be a number of layers >= 0 or 'all', got {self.recompute!r}")


@dataclass
class ServeConfig(_FromDict):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    registry: str = "lorakit-registry.sqlite"
    max_slots: int = 16  # adapters resident at once (LRU)
    max_lora_rank: int = 64  # adapters of a larger rank are refused; bounds slot memory (serve/slots.py)
    header_timeout: float = 10.0  # seconds a connection has to send a request head (serve/runtime.py)
    body_timeout: float = 30.0  # and its body
    max_batch: int = 16  # rows decoded together
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512


def load_config_file(path: str | Path) -> dict[str, Any]:
    """YAML or JSON file -> dict (sections 'lora', 'train', 'serve')."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    _unknown = sorted(set(data) - {"lora", "train", "serve"})
    if _unknown:
        raise ValueError(f"unknown config section(s) {_unknown} in {str(path)!r}; expected lora, train, serve")
    return data
