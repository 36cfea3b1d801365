"""The adapter registry in PostgreSQL (psycopg 3), for several servers that share it; files in a
content-addressed store (store.py) every replica reads.

    reg = PgRegistry("postgresql://lorakit@db/lorakit", store="/mnt/shared/lorakit-store",
                     base_fp=fingerprint(model), base_name="SmolLM2-135M-Instruct")

The interface and the invariants are the SQLite registry's (registry.py): numbered versions per name that
never repeat (the `adapters` row is the name's counter and is never deleted), one current version per name,
content hashes, the base fingerprint the registry belongs to, evaluations per version and base. Versions
point at blobs by content hash, so a name removed and added again with other files gets another blob, and a
server that keys its memory slots by that hash never serves the old weights.

Concurrent writers (any number of processes on any machines), READ COMMITTED plus locks:
- every change to a name (add, rollback, remove, eval) first locks that name's `adapters` row
  (SELECT ... FOR UPDATE), so changes to one name run one at a time and each sees the last one committed:
  the next number, the current version and the set of versions cannot be raced. Changes to different names
  do not wait for each other. The database enforces the rest: (name, version) is the primary key and a
  partial unique index allows one current row per name.
- a blob is written and deleted only under the transaction-scoped advisory lock of its hash: an add holds
  it from "is the blob there?" to the commit of the row that uses it; a removal's collection holds it from
  "does any row still use it?" to the blob's deletion. So a blob is never deleted under a row that uses it.
- a serialization failure or deadlock (none is expected from this lock order: a name, then a hash) is
  retried with backoff, up to 5 times. Chosen over SERIALIZABLE: the locks say what is protected and
  nothing aborts under contention; SERIALIZABLE would retry the common case of two adds to one name.

Every committed change sends NOTIFY lorakit_registry with a JSON payload (op, name, version, current);
`watch()` (registry_watch.py) follows them. A writer killed at any point (kill -9) leaves either its whole
change or none of it in the database (a transaction), and at most an unreferenced blob or a temp copy in
the store, which `clean_store()` removes at the next open (under the hash's lock, so a live writer's copy is
never touched).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lorakit import faults
from lorakit.adapters.refs import (AdapterVersion, IncompatibleAdapter, UnknownAdapter, content_sha256, entry_files,
                                   parse_ref, validate_name)
from lorakit.adapters.pg import CHANNEL, Pg, sha_lock
from lorakit.adapters.registry import Registry
from lorakit.adapters.store import open_store, verify

log = logging.getLogger("lorakit.registry")
SCHEMA_LOCK = 0x6C6F72616B6974  # advisory lock key while creating the schema ("lorakit")
SCHEMA = """
CREATE TABLE IF NOT EXISTS lorakit_meta (id INTEGER PRIMARY KEY CHECK (id = 1), schema_version INTEGER NOT NULL,
    base_name TEXT, base_fingerprint JSONB, store TEXT, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',
    next_version BIGINT NOT NULL DEFAULT 1 CHECK (next_version >= 1), created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS versions (name TEXT NOT NULL REFERENCES adapters(name), version BIGINT NOT NULL
    CHECK (version >= 1), sha256 TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'), files TEXT[] NOT NULL,
    fingerprint JSONB, config JSONB NOT NULL, num_params BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    current BOOLEAN NOT NULL DEFAULT FALSE, PRIMARY KEY (name, version));
CREATE UNIQUE INDEX IF NOT EXISTS versions_one_current ON versions (name) WHERE current;
CREATE INDEX IF NOT EXISTS versions_sha256 ON versions (sha256);
CREATE TABLE IF NOT EXISTS evals (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, version BIGINT NOT NULL,
    base_shape_hash TEXT, base_weight_hash TEXT, metrics JSONB NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    FOREIGN KEY (name, version) REFERENCES versions (name, version) ON DELETE CASCADE);
"""
ROW = """SELECT v.*, COALESCE((SELECT json_agg(json_build_object('base_shape_hash', e.base_shape_hash,
    'base_weight_hash', e.base_weight_hash, 'metrics', e.metrics, 'created_at', e.created_at) ORDER BY e.id)
    FROM evals e WHERE e.name = v.name AND e.version = v.version), '[]') AS evals FROM versions v """


class PgRegistry:
    # the file checks and the base record's rules are the SQLite registry's, word for word
    require_base = Registry.require_base
    check_fits = Registry.check_fits
    add = Registry.add

    def __init__(self, url: str, *, base_fp: dict | None = None, base_name: str | None = None,
                 store: str | Path | None = None, connect_timeout: float = 10):
        self.db = Pg(url, connect_timeout)
        self.url, self.path = url, self.db.shown

        def init(cur):
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cur.execute(SCHEMA)
            return self._init_meta(cur, base_fp, base_name, store)
        meta = self.db.write(init)
        self.base_name = meta["base_name"]
        self.base_fp = meta["base_fingerprint"] if base_fp is None else base_fp
        self.store = open_store(store or meta["store"])
        self.clean_store()

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- base record and store
    def _init_meta(self, cur, base_fp, base_name, store) -> dict:
        from psycopg.types.json import Jsonb

        cur.execute("SELECT * FROM lorakit_meta WHERE id = 1")
        row = cur.fetchone()
        if row is None:
            if store is None:
                raise ValueError(f"the registry {self.path!r} is new: give --store (or $LORAKIT_STORE), the "
                                 "directory or URL every replica reads adapter files from")
            row = {"base_name": base_name, "base_fingerprint": base_fp, "store": str(store)}
            cur.execute("INSERT INTO lorakit_meta VALUES (1, 1, %s, %s, %s, %s)",
                        (base_name, Jsonb(base_fp) if base_fp else None, str(store), time.time()))
            return row
        stored = row["base_fingerprint"]
        if stored is None and base_fp is not None:
            cur.execute("UPDATE lorakit_meta SET base_name = %s, base_fingerprint = %s WHERE id = 1",
                        (base_name, Jsonb(base_fp)))
            return {**row, "base_name": base_name, "base_fingerprint": base_fp}
        if stored is not None and base_fp is not None:
            for key in ("architecture", "shape_hash", "weight_hash"):
                if stored.get(key) != base_fp.get(key):
                    raise IncompatibleAdapter(
                        f"registry {self.path!r} belongs to base {row['base_name']!r} ({key} {stored.get(key)}), "
                        f"but the model given is {base_name!r} ({key} {base_fp.get(key)}); use another "
                        "database for another base")
        if store is not None and str(store) != row["store"]:
            log.info("registry %s records store %s; this process reads it at %s", self.path, row["store"], store)
        return row

    def clean_store(self) -> list[str]:
        """Remove blobs no version uses and what interrupted writers left, each under its hash's lock (one
        that a live writer holds is skipped). Returns what was removed."""
        gone: list[str] = []
        try:
            live = {r["sha256"] for r in self.db.q("SELECT DISTINCT sha256 FROM versions")}
            for sha in self.store.shas():
                if sha not in live and self._collect(sha, wait=False):
                    gone.append(sha)
            for sha, path in self.store.leftovers():
                if sha in live:  # used by a version, yet incomplete: damaged, not ours to remove
                    log.warning("blob %s in the store %s is used by a version but incomplete", sha, self.store.url)
                elif sha is None:
                    self.store.remove_leftover(path)
                    gone.append(str(path))
                elif self._under_free_lock(sha, lambda p=path: self.store.remove_leftover(p)):
                    gone.append(str(path))
        except OSError as e:  # a read-only store: serve what is there
            log.warning("could not clean the registry store %s: %s", self.store.url, e)
        if gone:
            log.warning("removed %d leftover(s) of interrupted registry changes: %s", len(gone), ", ".join(gone))
        return gone

    def _under_free_lock(self, sha: str, fn) -> bool:
        """Run fn() holding sha's lock if nobody else holds it (a live writer's copy is left alone)."""
        def tx(cur):
            if not cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (sha_lock(sha),)).fetchone()["ok"]:
                return False
            fn()
            return True
        return self.db.write(tx)

    def _collect(self, sha: str, wait: bool = True) -> bool:
        """Delete blob `sha` if no version uses it, under its lock. True if deleted."""
        def tx(cur):
            if wait:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (sha_lock(sha),))
            elif not cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (sha_lock(sha),)).fetchone()["ok"]:
                return False
            if cur.execute("SELECT 1 FROM versions WHERE sha256 = %s LIMIT 1", (sha,)).fetchone():
                return False
            faults.point("registry.gc.deleting")
            self.store.delete(sha)
            return True
        return self.db.write(tx)

    # ---------------------------------------------------------------- changes
    def _lock_name(self, cur, name: str, create: bool = False):
        if create:
            cur.execute("INSERT INTO adapters (name, created_at) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                        (name, time.time()))
        return cur.execute("SELECT * FROM adapters WHERE name = %s FOR UPDATE", (name,)).fetchone()

    def _row_in(self, cur, name: str, version: int) -> AdapterVersion:
        """Version `name@version` as this transaction sees it."""
        return self._row_to_version(cur.execute(ROW + "WHERE v.name = %s AND v.version = %s",
                                                (name, version)).fetchone())

    @staticmethod
    def _notify(cur, **payload) -> None:
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(payload)))

    def add_version(self, name: str, src: Path, files: tuple[str, ...], *, fingerprint: dict | None, config: dict,
                    num_params: int, description: str = "", skip_if_current: bool = False,
                    metrics: dict | None = None) -> AdapterVersion:
        """The shared core of adding (adapters and mixtures, checked by the caller): put `files` of `src` in the
        store, record them as the next version of `name` and make it current, in one transaction."""
        from psycopg.types.json import Jsonb

        validate_name(name)
        src, files = Path(src), tuple(files)
        sha = content_sha256(src, files)

        def tx(cur):
            row = self._lock_name(cur, name, create=True)
            faults.point("registry.add.locked")
            cur.execute("SELECT version, sha256 FROM versions WHERE name = %s AND current", (name,))
            cur_row = cur.fetchone()
            if skip_if_current and cur_row is not None and cur_row["sha256"] == sha:
                return self._row_in(cur, name, cur_row["version"])
            top = cur.execute("SELECT MAX(version) AS v FROM versions WHERE name = %s", (name,)).fetchone()["v"]
            version = max(row["next_version"], (top or 0) + 1)
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (sha_lock(sha),))
            wrote = not self.store.has(sha, files)
            if wrote:
                self.store.put(src, files, sha)
            try:
                faults.point("registry.add.blob_written")
                now = time.time()
                cur.execute("UPDATE versions SET current = FALSE WHERE name = %s AND current", (name,))
                cur.execute("INSERT INTO versions VALUES (%s, %s, %s, %s, %s, %s, %s, %s, TRUE)",
                            (name, version, sha, list(files), Jsonb(fingerprint) if fingerprint else None,
                             Jsonb(config), num_params, now))
                cur.execute("UPDATE adapters SET next_version = %s, description = CASE WHEN %s = '' THEN "
                            "description ELSE %s END WHERE name = %s", (version + 1, description, description, name))
                if isinstance(metrics, dict) and metrics:
                    self._insert_eval(cur, name, version, metrics, self.base_fp)
                self._notify(cur, op="add", name=name, version=version, current=version, sha256=sha)
                faults.point("registry.add.before_commit")
            except BaseException:
                if wrote:  # still under the hash's lock: nobody else can have started using it
                    self.store.delete(sha)
                raise
            return self._row_in(cur, name, version)

        v = self.db.write(tx)
        faults.point("registry.add.committed")
        return v  # as committed (another writer may change it at once: resolving again could miss it)

    def rollback(self, name: str, to: int | None = None) -> AdapterVersion:
        """Make version `to` (default: the newest one older than the current) current."""
        validate_name(name)

        def tx(cur):
            if self._lock_name(cur, name) is None:
                raise UnknownAdapter(f"unknown adapter {name!r}")
            cur_row = cur.execute("SELECT version FROM versions WHERE name = %s AND current", (name,)).fetchone()
            if cur_row is None:
                raise UnknownAdapter(f"unknown adapter {name!r}")
            target = to
            if target is None:
                target = cur.execute("SELECT MAX(version) AS v FROM versions WHERE name = %s AND version < %s",
                                     (name, cur_row["version"])).fetchone()["v"]
                if target is None:
                    raise ValueError(f"adapter {name!r} has no version older than the current v{cur_row['version']}")
            elif not cur.execute("SELECT 1 FROM versions WHERE name = %s AND version = %s", (name, target)).fetchone():
                have = [r["version"] for r in cur.execute(
                    "SELECT version FROM versions WHERE name = %s ORDER BY version", (name,))]
                raise UnknownAdapter(f"adapter {name!r} has no version {target}; it has {have}")
            cur.execute("UPDATE versions SET current = FALSE WHERE name = %s AND current", (name,))
            cur.execute("UPDATE versions SET current = TRUE WHERE name = %s AND version = %s", (name, target))
            self._notify(cur, op="rollback", name=name, version=target, current=target)
            faults.point("registry.rollback.before_commit")
            return self._row_in(cur, name, target)

        return self.db.write(tx)

    def remove(self, ref: str) -> list[AdapterVersion]:
        """Remove 'name' (every version) or 'name@N' (one). Returns what was removed. Blobs no version uses
        any more are deleted after the commit (a kill in between leaves them to clean_store)."""
        name, version = parse_ref(ref)

        def tx(cur):
            if self._lock_name(cur, name) is None:
                raise UnknownAdapter(f"unknown adapter {ref!r}")
            gone = [self._row_to_version(r) for r in cur.execute(
                ROW + "WHERE v.name = %s AND (%s::bigint IS NULL OR v.version = %s) ORDER BY v.version",
                (name, version, version))]
            if not gone:
                raise UnknownAdapter(f"unknown adapter {ref!r}")
            cur.execute("DELETE FROM versions WHERE name = %s AND (%s::bigint IS NULL OR version = %s)",
                        (name, version, version))
            left = cur.execute("SELECT MAX(version) AS v, BOOL_OR(current) AS c FROM versions WHERE name = %s",
                               (name,)).fetchone()
            if left["v"] is not None and not left["c"]:
                cur.execute("UPDATE versions SET current = TRUE WHERE name = %s AND version = %s", (name, left["v"]))
            if left["v"] is None:  # the row stays: its next_version keeps numbers from repeating
                cur.execute("UPDATE adapters SET description = '' WHERE name = %s", (name,))
            current = cur.execute("SELECT version FROM versions WHERE name = %s AND current", (name,)).fetchone()
            self._notify(cur, op="remove", name=name, removed=[v.version for v in gone],
                         current=current["version"] if current else None, sha256=sorted({v.sha256 for v in gone}))
            faults.point("registry.remove.before_commit")
            return gone

        gone = self.db.write(tx)
        faults.point("registry.remove.committed")
        for sha in sorted({v.sha256 for v in gone}):
            self._collect(sha)
        return gone

    def add_eval(self, ref: str, metrics: dict, base_fp: dict | None = None) -> None:
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"metrics must be a non-empty JSON object, got {metrics!r}")
        name, version = parse_ref(ref)

        def tx(cur):
            row = cur.execute("SELECT version FROM versions WHERE name = %s AND "
                              "(CASE WHEN %s::bigint IS NULL THEN current ELSE version = %s END) FOR SHARE",
                              (name, version, version)).fetchone()
            if row is None:
                raise UnknownAdapter(f"unknown adapter {ref!r}")
            self._insert_eval(cur, name, row["version"], metrics, base_fp or self.base_fp)
        self.db.write(tx)

    @staticmethod
    def _insert_eval(cur, name, version, metrics, base_fp) -> None:
        from psycopg.types.json import Jsonb

        fp = base_fp or {}
        cur.execute("INSERT INTO evals (name, version, base_shape_hash, base_weight_hash, metrics, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)", (name, version, fp.get("shape_hash"),
                                                        fp.get("weight_hash"), Jsonb(metrics), time.time()))

    # ---------------------------------------------------------------- queries
    def local_files(self, v: AdapterVersion) -> Path:
        """A local directory holding version `v`'s files (an object store's are downloaded to the local cache
        once), checked against the content hash: ValueError if they do not match."""
        files = entry_files(v.name)
        return verify(self.store.local_dir(v.sha256, files), v.sha256, files)

    def _row_to_version(self, row) -> AdapterVersion:
        evals = row["evals"] if isinstance(row["evals"], list) else json.loads(row["evals"])
        return AdapterVersion(row["name"], row["version"], self.store.local_dir(row["sha256"]), row["sha256"],
                              row["config"], row["fingerprint"], row["num_params"], row["created_at"],
                              bool(row["current"]), evals)

    def resolve(self, ref: str) -> AdapterVersion:
        """'name' (the current version) or 'name@N' -> that version, as committed now; UnknownAdapter if absent."""
        name, version = parse_ref(ref)
        if version is None:
            row = self.db.q1(ROW + "WHERE v.name = %s AND v.current", (name,))
        else:
            row = self.db.q1(ROW + "WHERE v.name = %s AND v.version = %s", (name, version))
        if row is None:
            have = [] if version is None else [v.version for v in self.versions(name)]
            raise UnknownAdapter(f"unknown adapter {ref!r}" + (f"; {name!r} has versions {have}" if have else ""))
        return self._row_to_version(row)

    def versions(self, name: str) -> list[AdapterVersion]:
        validate_name(name)
        return [self._row_to_version(r) for r in self.db.q(ROW + "WHERE v.name = %s ORDER BY v.version", (name,))]

    def find_sha(self, sha256: str) -> list[AdapterVersion]:
        """Every version (any name) whose files have this content hash."""
        return [self._row_to_version(r) for r in self.db.q(ROW + "WHERE v.sha256 = %s ORDER BY v.name, v.version",
                                                         (sha256,))]

    def live_shas(self, shas: list[str]) -> set[str]:
        """Those of `shas` that some version still uses."""
        return {r["sha256"] for r in self.db.q("SELECT DISTINCT sha256 FROM versions WHERE sha256 = ANY(%s)",
                                             (list(shas),))}

    def list(self) -> list[AdapterVersion]:
        """The current version of every adapter, by name."""
        return [self._row_to_version(r) for r in self.db.q(ROW + "WHERE v.current ORDER BY v.name")]

    def describe(self, name: str) -> dict:
        vs = self.versions(name)
        if not vs:
            raise UnknownAdapter(f"unknown adapter {name!r}")
        row = self.db.q1("SELECT description, created_at FROM adapters WHERE name = %s", (name,))
        cur = next(v.version for v in vs if v.current)
        return {"name": name, "description": row["description"], "created_at": row["created_at"],
                "current_version": cur, "versions": [v.to_json() for v in vs]}

    def watch(self, callback, tick_s: float = 1.0):
        """Follow committed changes: callback(payload dict) per change, callback(None) every tick_s without
        one, callback({"op": "resync"}) after a lost connection came back. Returns the Watcher (stop())."""
        from lorakit.adapters.registry_watch import Watcher

        return Watcher(self, callback, tick_s).start()

