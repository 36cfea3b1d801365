"""Tests load a script or bench file (a file, not a package module) by its path from the project root."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(rel: str):
    """The module made by running ROOT/rel (its name: the file's stem)."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
