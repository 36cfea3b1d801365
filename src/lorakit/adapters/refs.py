"""Names, references and records of registry entries: 'name', 'name@N', and mixtures 'mix:name[@N]'."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MIX = "mix:"  # the name prefix of mixture entries
MIX_DIR = "@mix"  # their files under the store (no adapter name starts with '@')
CONFIG_NAME = "adapter_config.json"  # an adapter directory's two files (PEFT's names)
WEIGHTS_NAME = "adapter_model.safetensors"
MIX_FILES = ("mixture.json", "router.safetensors")  # a mixture's two (adapters/mixtures.FILES)


def content_sha256(path: str | Path, names: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)) -> str:
    """sha256 over the files `names` of directory `path`, in that order: an adapter's identity (the registry
    keys versions and server slots by it; a mixture records it for every adapter it gates)."""
    h = hashlib.sha256()
    for f in names:
        p = Path(path) / f
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} does not exist")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def entry_files(name: str) -> tuple[str, ...]:
    """The files a registry entry's versions hold, in content-hash order: an adapter's PEFT pair or a mixture's."""
    return MIX_FILES if name.startswith(MIX) else (CONFIG_NAME, WEIGHTS_NAME)


class UnknownAdapter(ValueError):
    """No such adapter (or version): HTTP 404."""


class IncompatibleAdapter(ValueError):
    """The adapter does not fit the registry's base model: HTTP 409."""


@dataclass
class AdapterVersion:
    name: str
    version: int
    path: Path
    sha256: str
    config: dict
    fingerprint: dict | None
    num_params: int
    created_at: float
    current: bool
    evals: list[dict] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "mixture" if self.name.startswith(MIX) else "adapter"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict:
        extra = {"pinned": self.config.get("pinned")} if self.kind == "mixture" else {}
        return {"name": self.name, "version": self.version, "id": self.ref, "kind": self.kind, **extra,
                "path": str(self.path), "sha256": self.sha256, "current": self.current,
                "created_at": self.created_at, "num_params": self.num_params,
                "r": self.config.get("r"), "lora_alpha": self.config.get("lora_alpha"),
                "target_modules": self.config.get("target_modules"),
                "base_fingerprint": _short_fp(self.fingerprint), "evals": self.evals}


def _short_fp(fp: dict | None) -> dict | None:
    return None if fp is None else {k: v for k, v in fp.items() if k != "shapes"}


def validate_name(name: object) -> str:
    """Adapter names are 1-64 letters, digits, '_' or '-' (never a path: no '/', '.', '..'); a mixture's
    name is 'mix:' and such a name."""
    bare = name[len(MIX):] if isinstance(name, str) and name.startswith(MIX) else name
    if not isinstance(bare, str) or not NAME_RE.fullmatch(bare):
        raise ValueError(f"invalid adapter name {name!r}: expected 1-64 characters of letters, digits, "
                         "'_' or '-', starting with a letter or digit (no paths), or 'mix:' and such a name")
    return name


def rel_dir(name: str) -> str:
    """Where an entry's versions live, relative to the store."""
    return f"{MIX_DIR}/{name[len(MIX):]}" if name.startswith(MIX) else name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' or 'name@3' -> (name, version or None)."""
    name, sep, ver = str(ref).partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not re.fullmatch(r"[0-9]{1,18}", ver) or int(ver) < 1:
        raise ValueError(f"invalid adapter version in {ref!r}: expected name@N with N a positive integer "
                         "(at most 18 digits)")
    return name, int(ver)


