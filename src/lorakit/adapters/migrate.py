"""`lorakit adapters migrate --from reg.sqlite --to postgresql://...`: a SQLite registry into a PostgreSQL one.

Everything moves in one transaction: every name with its counter (so numbers never repeat after the move
either, even for names whose versions were all removed), description and creation time; every version with
its number, content hash, base fingerprint, config, parameter count, creation time and which one is current;
the evaluations of the versions that exist. Files are checked against their recorded hash and put into the
content-addressed store (store.py) under each hash's lock. The target must not hold any of the names (a
registry is never merged over silently) and must belong to the same base. A failure, or a kill, leaves the
target as it was (blobs already copied are unreferenced, and the next open removes them)."""
from __future__ import annotations

import logging
from pathlib import Path

from lorakit import faults
from lorakit.adapters.pg import sha_lock
from lorakit.adapters.refs import entry_files
from lorakit.adapters.registry import Registry
from lorakit.adapters.registry_pg import PgRegistry
from lorakit.adapters.store import verify

log = logging.getLogger("lorakit.registry")


def migrate(sqlite_path: str | Path, url: str, store: str | Path | None = None) -> dict:
    """Copy the SQLite registry at `sqlite_path` into the PostgreSQL registry at `url`. -> counts."""
    if not Path(sqlite_path).is_file():
        raise FileNotFoundError(f"SQLite registry {str(sqlite_path)!r} does not exist")
    src = Registry(sqlite_path)
    try:
        dst = PgRegistry(url, base_fp=src.base_fp, base_name=src.base_name, store=store)
        try:
            return _copy(src, dst)
        finally:
            dst.close()
    finally:
        src.close()


def _copy(src: Registry, dst: PgRegistry) -> dict:
    from psycopg.types.json import Jsonb

    names = [dict(r) for r in src._q("SELECT * FROM adapters ORDER BY name")]
    versions = [dict(r) for r in src._q("SELECT * FROM versions ORDER BY name, version")]
    evals = [dict(r) for r in src._q("SELECT * FROM evals ORDER BY id")]
    for v in versions:  # every file whole and as registered, before the target is touched
        verify(src.store / v["path"], v["sha256"], entry_files(v["name"]))
    top = {}
    for v in versions:
        top[v["name"]] = max(top.get(v["name"], 0), v["version"])
    live = {(v["name"], v["version"]) for v in versions}

    def tx(cur):
        clash = [r["name"] for r in cur.execute("SELECT name FROM adapters WHERE name = ANY(%s) ORDER BY name",
                                                ([n["name"] for n in names],))]
        if clash:
            raise ValueError(f"the target registry {dst.path!r} already has {clash}: migrate into a registry "
                             "without these names (nothing was copied)")
        for n in names:
            cur.execute("INSERT INTO adapters VALUES (%s, %s, %s, %s)", (
                n["name"], n["description"], max(n["next_version"], top.get(n["name"], 0) + 1), n["created_at"]))
        wrote: list[str] = []
        try:
            for v in versions:
                files = entry_files(v["name"])
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (sha_lock(v["sha256"]),))
                if not dst.store.has(v["sha256"], files):
                    dst.store.put(src.store / v["path"], files, v["sha256"])
                    wrote.append(v["sha256"])
                fp = Jsonb(_json(v["fingerprint"])) if v["fingerprint"] else None
                cur.execute("INSERT INTO versions VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            (v["name"], v["version"], v["sha256"], list(files), fp, Jsonb(_json(v["config"])),
                             v["num_params"], v["created_at"], bool(v["current"])))
            kept = [e for e in evals if (e["name"], e["version"]) in live]
            for e in kept:
                cur.execute("INSERT INTO evals (name, version, base_shape_hash, base_weight_hash, metrics, created_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s)", (e["name"], e["version"], e["base_shape_hash"],
                                                                 e["base_weight_hash"], Jsonb(_json(e["metrics"])),
                                                                 e["created_at"]))
            dst._notify(cur, op="migrate", names=[n["name"] for n in names])
            faults.point("registry.migrate.before_commit")
        except BaseException:
            for sha in wrote:  # still under their locks
                dst.store.delete(sha)
            raise
        return {"names": len(names), "versions": len(versions), "evals": len(kept),
                "evals_of_removed_versions_skipped": len(evals) - len(kept), "blobs_written": len(wrote)}

    counts = dst.db.write(tx)
    log.info("migrated %s into %s: %s", src.path, dst.path, counts)
    return counts


def _json(text):
    import json

    return json.loads(text) if isinstance(text, str) else text
