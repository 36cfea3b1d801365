"""Which registry a `--registry` names: a file path is the embedded SQLite registry (registry.py), a
postgresql:// URL the shared PostgreSQL one (registry_pg.py) that several servers use at once. Both have the
same methods (add, add_version, rollback, remove, add_eval, resolve, versions, find_sha, list, describe,
local_files, close) and keep the same invariants."""
from __future__ import annotations

from pathlib import Path

from lorakit.adapters.pg import is_url
from lorakit.adapters.registry import Registry


def open_registry(spec: str | Path, *, base_fp: dict | None = None, base_name: str | None = None,
                  store: str | Path | None = None):
    """A Registry (SQLite file) or a PgRegistry (postgresql:// URL). `store`: where adapter files live (SQLite:
    default <file>.store/; PostgreSQL: recorded in the database on first use, every replica reads it; a
    replica that mounts it elsewhere passes its own path)."""
    if is_url(spec):
        from lorakit.adapters.registry_pg import PgRegistry

        return PgRegistry(str(spec), base_fp=base_fp, base_name=base_name, store=store)
    return Registry(spec, base_fp=base_fp, base_name=base_name, store=store)
