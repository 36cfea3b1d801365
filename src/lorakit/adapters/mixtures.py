"""The mixture artifact: one directory that says exactly what a trained router gates, checked on every load.

    mixes/support-sales/
      router.safetensors   the gates: gates.<layer path with '.' -> '__'>.weight (K, in) and .bias (K,)
      mixture.json         format, temperature, routed layers (model order), the K adapters in gate order,
                           each with its name, content sha256 (adapters/peft_files.content_sha256, the registry's
                           hash) and where it was (absolute, and relative to this directory), and the base
                           fingerprint the router was trained on (architecture, shape and weight hashes)
      router.json, metrics.jsonl, train_config.json, train_done.json   (the training run's own files)

`load_mixture(model, dir)` checks the base, finds every adapter (its recorded places, or a directory the
caller names), refuses one that is missing or whose files changed, naming it, loads them and attaches the
router. In a registry a mixture is the entry `mix:<name>`, pinned to the adapter versions of the same content
(`add_mixture`, `resolve_mixture`); the server runs it per token (serve/slots.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.intake import MAX_JSON_BYTES, open_member, read_member, staged_copy, staging_root
from lorakit.adapters.peft_files import content_sha256, fingerprint, load_adapter
from lorakit.adapters.refs import MIX, IncompatibleAdapter, UnknownAdapter, validate_name
from lorakit.core.inject import set_active
from lorakit.core.mixture import ROUTER_FILE, Router, gate_key
from lorakit.files import atomic_write_json
from lorakit.version import __version__

log = logging.getLogger("lorakit.mixture")
MIXTURE_FILE = "mixture.json"
FILES = (MIXTURE_FILE, ROUTER_FILE)  # what the content hash covers and the registry copies
MAX_ROUTER_BYTES = 4 << 30  # a router is K gates of (K, in) per layer: far below this
FORMAT = "lorakit.mixture/1"
BASE_KEYS = ("architecture", "model_type", "hidden_size", "num_layers", "shape_hash", "weight_hash")


@dataclass
class MixtureFile:
    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]  # the router's state dict

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.manifest["adapters"]]

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def base(self) -> dict:
        return self.manifest["base"]

    def gates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer path -> (weight (K, in), bias (K,)), float32."""
        return {p: (self.tensors[f"gates.{gate_key(p)}.weight"].float(), self.tensors[f"gates.{gate_key(p)}.bias"].float())
                for p in self.layers}

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def is_mixture(path: str | Path) -> bool:
    return (Path(path) / MIXTURE_FILE).is_file()


def mixture_metadata(path: str | Path) -> dict:
    """How the router's training rows were rendered ({"template", "chat_template_sha256"}, as an adapter's
    metadata records it; {} if not recorded), without reading the gates."""
    m = read_mixture(path).manifest
    return {k: m[k] for k in ("template", "chat_template_sha256") if k in m}


def write_mixture(out_dir: str | Path, router: Router, adapter_dirs: dict[str, str | Path], base_fp: dict,
                  base_name: str | None = None, extra: dict | None = None) -> Path:
    """Write `router` and the manifest naming its adapters (hashed now, from `adapter_dirs`) and the base."""
    out = Path(out_dir)
    if list(adapter_dirs) != router.names:
        raise ValueError(f"adapter_dirs {list(adapter_dirs)} must name the router's adapters {router.names} in order")
    router.save(out)
    adapters = []
    for name, d in adapter_dirs.items():
        d = Path(d).resolve()
        adapters.append({"name": name, "sha256": content_sha256(d), "path": str(d),
                         "relpath": os.path.relpath(d, out.resolve())})
    manifest = {"format": FORMAT, "lorakit_version": __version__, "temperature": router.temperature,
                "layers": router.layer_paths, "adapters": adapters,
                "base": {"name": base_name, **{k: base_fp.get(k) for k in BASE_KEYS}},
                "router_params": sum(p.numel() for p in router.parameters()), **(extra or {})}
    atomic_write_json(out / MIXTURE_FILE, manifest)
    return out


def _bad(where: Path, what: str) -> ValueError:
    return ValueError(f"{str(where)!r}: {what}")


def read_mixture(path: str | Path) -> MixtureFile:
    """Read and check a mixture directory's manifest and gate tensors (not yet against a base or adapters)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    mpath, rpath = path / MIXTURE_FILE, path / ROUTER_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"mixture directory {str(path)!r} does not exist")
    if not mpath.is_file():
        hint = " (a router trained before mixtures were one artifact: run lorakit train-router again)" \
            if (path / "router.json").is_file() else ""
        raise FileNotFoundError(f"{str(path)!r} holds no {MIXTURE_FILE}{hint}")
    try:
        m = json.loads(read_member(path, MIXTURE_FILE))  # a regular file of bounded size
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(mpath, f"not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(mpath, f"expected a JSON object with format {FORMAT!r}")
    ads = m.get("adapters")
    if not isinstance(ads, list) or len(ads) < 2 or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("sha256"), str) for a in ads):
        raise _bad(mpath, "'adapters' must list at least two {name, sha256} objects")
    for a in ads:
        validate_name(a["name"])
    if len({a["name"] for a in ads}) != len(ads):
        raise _bad(mpath, f"adapter names repeat: {[a['name'] for a in ads]}")
    t = m.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise _bad(mpath, f"'temperature' must be a positive number, got {t!r}")
    if not isinstance(m.get("layers"), list) or not m["layers"] or not all(isinstance(p, str) for p in m["layers"]):
        raise _bad(mpath, "'layers' must list the routed layers' module paths")
    if not isinstance(m.get("base"), dict) or not m["base"].get("shape_hash"):
        raise _bad(mpath, "'base' must hold the base fingerprint (architecture, shape_hash, weight_hash)")
    if not os.path.lexists(rpath):
        raise FileNotFoundError(f"mixture {str(path)!r} has no {ROUTER_FILE}")
    os.close(open_member(path, ROUTER_FILE, MAX_ROUTER_BYTES, inside=False)[0])  # a regular file
    try:
        tensors = load_file(str(rpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(rpath, f"not a readable safetensors file: {e}") from None
    k = len(ads)
    want = {f"gates.{gate_key(p)}.{s}" for p in m["layers"] for s in ("weight", "bias")}
    if set(tensors) != want:
        raise _bad(rpath, f"gate tensors do not match the manifest's layers: missing {sorted(want - set(tensors))[:3]}, "
                          f"unexpected {sorted(set(tensors) - want)[:3]}")
    for key, v in tensors.items():
        shape_ok = v.dim() == 2 and v.shape[0] == k if key.endswith(".weight") else tuple(v.shape) == (k,)
        if not shape_ok or not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise _bad(rpath, f"{key!r} must be a finite float tensor with {k} gate rows, got {v.dtype} "
                              f"{tuple(v.shape)}")
    return MixtureFile(path, m, tensors)


def check_base(mf: MixtureFile, base_fp: dict) -> None:
    """Raise IncompatibleAdapter if the base `base_fp` is not the one the router was trained on."""
    b = mf.base
    for key, what in (("architecture", "architecture"), ("shape_hash", "layer shapes"),
                      ("weight_hash", "base weights")):
        if b.get(key) != base_fp.get(key):
            raise IncompatibleAdapter(
                f"mixture {str(mf.path)!r} was trained on another base: its {what} ({key} {b.get(key)}, "
                f"{b.get('name') or b.get('architecture')}) differ from this model's ({base_fp.get(key)}, "
                f"{base_fp.get('architecture')})")


def _candidates(mf: MixtureFile, entry: dict) -> list[Path]:
    out = []
    if entry.get("relpath"):
        out.append((mf.path / entry["relpath"]).resolve())
    if entry.get("path"):
        out.append(Path(entry["path"]))
    return list(dict.fromkeys(out))


def adapter_status(mf: MixtureFile, dirs: dict[str, str | Path] | None = None) -> list[dict]:
    """Per adapter: name, sha256, the directory checked and status 'ok' | 'missing' | 'changed'."""
    out = []
    for a in mf.manifest["adapters"]:
        places = [Path(dirs[a["name"]])] if dirs and a["name"] in dirs else _candidates(mf, a)
        found = [p for p in places if p.is_dir()]
        shas = {}
        for p in found:
            try:
                shas[p] = content_sha256(p)
            except FileNotFoundError:
                shas[p] = None
        match = next((p for p in found if shas[p] == a["sha256"]), None)
        status = "ok" if match else "changed" if found else "missing"
        where = match or (found[0] if found else (places[0] if places else None))
        out.append({"name": a["name"], "sha256": a["sha256"], "dir": str(where) if where else None,
                    "status": status, "found_sha256": shas.get(where)})
    return out


def locate_adapters(mf: MixtureFile, dirs: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """name -> the directory holding exactly the adapter the router was trained on; FileNotFoundError naming a
    missing adapter, ValueError naming a changed one."""
    unknown = sorted(set(dirs or {}) - set(mf.names))
    if unknown:
        raise ValueError(f"mixture {str(mf.path)!r} gates {mf.names}; it has no adapter {unknown[0]!r}")
    out = {}
    for s in adapter_status(mf, dirs):
        short = s["sha256"][:12]
        if s["status"] == "missing":
            raise FileNotFoundError(f"mixture {str(mf.path)!r} gates adapter {s['name']!r} (sha256 {short}...), "
                                    f"which is missing: no directory at {s['dir']!r}")
        if s["status"] == "changed":
            now = (s["found_sha256"] or "unreadable")[:12]
            raise ValueError(f"mixture {str(mf.path)!r} gates adapter {s['name']!r}, whose files at {s['dir']!r} "
                             f"changed since the router was trained (sha256 {now}... now, {short}... then); "
                             "restore that adapter or train the router again")
        out[s["name"]] = Path(s["dir"])
    return out


def load_mixture(model, path: str | Path, adapters: dict[str, str | Path] | None = None) -> Router:
    """Check the mixture at `path` against `model` and its adapters, load the adapters (under their names, not
    activated alone), make them the active set and attach the router. `adapters` (name -> dir) overrides where
    an adapter is looked for. Nothing is loaded into the model unless every check passes."""
    mf = read_mixture(path)
    check_base(mf, fingerprint(model))
    dirs = locate_adapters(mf, adapters)
    for name, d in dirs.items():
        load_adapter(model, d, name, activate=False)
    set_active(model, mf.names)
    router = Router(model, mf.names, mf.temperature)
    router.load_tensors(mf.tensors, str(mf.path))
    router.to(next(model.parameters()).device)
    router.attach(model)
    log.info("mixture %s: router over %s on %d layers", mf.path, ", ".join(mf.names), len(mf.layers))
    return router


# ---------------------------------------------------------------- registry entries (mix:<name>)
def add_mixture(reg, name: str, src: str | Path, *, description: str = "", skip_if_current: bool = False):
    """Register mixture directory `src` as the next version of `mix:<name>`, pinned to the registry's adapter
    versions with the same content hashes (the same name preferred). Refused (IncompatibleAdapter) when the
    mixture is for another base or an adapter it gates is in no version of the registry."""
    full = validate_name(name if not isinstance(name, str) or name.startswith(MIX) else MIX + name)
    # the copy first: it is what is read, checked, hashed and stored (adapters/intake.py)
    with staged_copy(src, {MIXTURE_FILE: MAX_JSON_BYTES, ROUTER_FILE: MAX_ROUTER_BYTES}, staging_root(reg)) as copy:
        return _add_checked(reg, full, src, copy, description, skip_if_current)


def _add_checked(reg, full: str, src, copy: Path, description: str, skip_if_current: bool):
    mf = read_mixture(copy)
    check_base(mf, reg.require_base())
    pinned = []
    for a in mf.manifest["adapters"]:
        same = [v for v in reg.find_sha(a["sha256"]) if v.kind == "adapter"]
        same.sort(key=lambda v: (v.name != a["name"], -v.version))
        if not same:
            raise IncompatibleAdapter(f"mixture {str(src)!r} gates adapter {a['name']!r} (sha256 "
                                      f"{a['sha256'][:12]}...), which is in no version of the registry: add that "
                                      f"adapter first (lorakit adapters add {a['name']} <its dir>)")
        pinned.append(same[0].ref)
    return reg.add_version(full, copy, FILES, fingerprint=mf.base, num_params=mf.num_params(),
                           config={"pinned": pinned, "manifest": mf.manifest}, description=description,
                           skip_if_current=skip_if_current)


def resolve_mixture(reg, ref: str):
    """'mix:name' or 'mix:name@N' -> (its version, the pinned adapter versions in gate order). Refused when a
    pinned version is gone from the registry (IncompatibleAdapter, naming it) or the ref is unknown."""
    v = reg.resolve(ref)
    if v.kind != "mixture":
        raise ValueError(f"{ref!r} is an adapter, not a mixture")
    out = []
    for pin, entry in zip(v.config["pinned"], v.config["manifest"]["adapters"]):
        try:
            a = reg.resolve(pin)
        except UnknownAdapter:
            raise IncompatibleAdapter(f"mixture {v.ref} is pinned to adapter {pin}, which is gone from the "
                                      "registry; add the adapter files again and register the mixture again "
                                      "(pins follow content hashes), or train a new router") from None
        if a.sha256 != entry["sha256"]:
            raise IncompatibleAdapter(f"mixture {v.ref}: pinned adapter {pin} has sha256 {a.sha256[:12]}..., the "
                                      f"router was trained on {entry['sha256'][:12]}...")
        out.append(a)
    return v, out
