"""Adapter registry: SQLite (stdlib sqlite3, WAL) plus a store directory holding each version's files.

A registry belongs to one base model (its fingerprint is stored on first use). Per adapter name it
keeps numbered versions (the files, the base fingerprint they were trained on, their config, when
they were added), which version is current, and evaluation results per adapter version and base.

    reg = Registry("adapters.sqlite", base_fp=fingerprint(model), base_name="SmolLM2-135M-Instruct")
    reg.add("support", "out/support")        # -> version 1, copied into adapters.store/support/v1
    reg.rollback("support")                  # an earlier version becomes current
    reg.resolve("support@1").path

Adding is atomic: the files are copied to a temp name and renamed, and the database row is written
in the same transaction; a failure leaves neither, and a process killed in between leaves at most a
temp or unrecorded directory, which the next open of the registry removes. An adapter whose shapes
(or base weights) do not fit the registry's base is refused with the reason (`IncompatibleAdapter`,
HTTP 409). Version numbers never repeat for a name, even after every version was removed: the
`adapters` row stays behind as the name's counter.

Mixtures of LoRAs (adapters/mixtures.py) are entries of the same kind named `mix:<name>`: numbered
versions, rollback, removal alike; their files live in <store>/@mix/<name>/vN and their `config` holds
the mixture's manifest and the adapter versions it is pinned to (`add_version` is the shared core).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from lorakit import faults
from lorakit.adapters.refs import (CONFIG_NAME, MIX, MIX_DIR, NAME_RE, WEIGHTS_NAME, AdapterVersion,  # noqa: F401
                                   IncompatibleAdapter, content_sha256,
                                   UnknownAdapter, parse_ref, rel_dir, validate_name)

log = logging.getLogger("lorakit.registry")
SCHEMA = """
CREATE TABLE IF NOT EXISTS base (id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT,
    fingerprint TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',
    next_version INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (name TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
    version INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, fingerprint TEXT,
    config TEXT NOT NULL, num_params INTEGER NOT NULL, created_at REAL NOT NULL,
    current INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS evals (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    version INTEGER NOT NULL, base_shape_hash TEXT, base_weight_hash TEXT, metrics TEXT NOT NULL,
    created_at REAL NOT NULL);
"""


class Registry:
    def __init__(self, path: str | Path, *, base_fp: dict | None = None, base_name: str | None = None,
                 store: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store = Path(store) if store else self.path.with_suffix(".store")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{str(self.path)!r} is not a usable SQLite registry: {e}") from None
        self.base_fp, self.base_name = self._init_base(base_fp, base_name)
        self.clean_store()

    def clean_store(self) -> list[Path]:
        """Remove what an interrupted add or remove left in the store: temp directories and version
        directories without a database row. Runs under the write lock, so no add is half done meanwhile
        (an add copies and renames inside its transaction). Returns what was removed."""
        if not self.store.is_dir():
            return []
        from lorakit.adapters.intake import clean_staging, staging_root

        gone = clean_staging(staging_root(self))  # copies of adds whose process died
        try:
            with self._write() as db:
                known = {r[0] for r in db.execute("SELECT path FROM versions")}
                mix = self.store / MIX_DIR
                for d in sorted(self.store.iterdir()) + (sorted(mix.iterdir()) if mix.is_dir() else []):
                    if not d.is_dir() or not NAME_RE.fullmatch(d.name):
                        continue
                    for sub in d.iterdir():
                        rel = sub.relative_to(self.store).as_posix()
                        stale = (sub.name.startswith(".") and ".tmp-" in sub.name) or \
                            (re.fullmatch(r"v\d+", sub.name) and rel not in known)
                        if stale:
                            shutil.rmtree(sub, ignore_errors=True)
                            gone.append(sub)
        except (OSError, sqlite3.Error) as e:  # a read-only store: serve what is there
            log.warning("could not clean the registry store %s: %s", self.store, e)
        if gone:
            log.warning("removed %d leftover(s) of interrupted registry changes: %s", len(gone),
                        ", ".join(str(g) for g in gone))
        return gone

    # ---------------------------------------------------------------- base record
    def _init_base(self, base_fp: dict | None, base_name: str | None) -> tuple[dict | None, str | None]:
        row = self._q1("SELECT name, fingerprint FROM base WHERE id = 1")
        if row is None:
            if base_fp is not None:
                with self._write():
                    self._db.execute("INSERT INTO base VALUES (1, ?, ?, ?)",
                                     (base_name, json.dumps(base_fp), time.time()))
            return base_fp, base_name
        stored = json.loads(row["fingerprint"])
        if base_fp is not None:
            for key in ("architecture", "shape_hash", "weight_hash"):
                if stored.get(key) != base_fp.get(key):
                    raise IncompatibleAdapter(
                        f"registry {str(self.path)!r} belongs to base {row['name']!r} ({key} "
                        f"{stored.get(key)}), but the model given is {base_name!r} ({key} {base_fp.get(key)}); "
                        "use another registry file for another base")
            if "kinds" not in stored and base_fp.get("kinds"):  # recorded before layer kinds were: add them
                stored = {**stored, "kinds": base_fp["kinds"], "kernels": base_fp.get("kernels", {})}
                try:
                    with self._write():
                        self._db.execute("UPDATE base SET fingerprint = ? WHERE id = 1", (json.dumps(stored),))
                except sqlite3.Error as e:  # read-only: check with them in memory
                    log.warning("could not record the base's layer kinds in %s: %s", self.path, e)
        return stored, row["name"]

    def require_base(self) -> dict:
        if self.base_fp is None:
            raise ValueError(f"registry {str(self.path)!r} has no base model yet; pass --model once so it "
                             "can record the base fingerprint adapters are checked against")
        return self.base_fp

    # ---------------------------------------------------------------- plumbing
    def _q(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _q1(self, sql: str, args=()):
        rows = self._q(sql, args)
        return rows[0] if rows else None

    class _Tx:
        def __init__(self, reg):
            self.reg = reg

        def __enter__(self):
            self.reg._lock.acquire()
            self.reg._db.execute("BEGIN IMMEDIATE")
            return self.reg._db

        def __exit__(self, typ, *_):
            try:
                self.reg._db.execute("COMMIT" if typ is None else "ROLLBACK")
            finally:
                self.reg._lock.release()

    def _write(self):
        return Registry._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- checks
    def check_fits(self, af, force: bool = False) -> None:
        """Raise IncompatibleAdapter with the reason if adapter file `af` does not fit the base."""
        base = self.require_base()
        try:
            from lorakit.adapters.peft_files import check_compatible, check_layouts  # torch: only where files are checked

            check_compatible(af.module_shapes(), base)
        except ValueError as e:
            raise IncompatibleAdapter(str(e)) from None
        check_layouts(af, base)  # a file malformed for the base's layer kinds: ValueError, a 400
        fp = af.fingerprint
        if fp and fp.get("architecture") != base.get("architecture"):
            raise IncompatibleAdapter(f"adapter is for another base: trained on a {fp.get('architecture')}, "
                                      f"the registry's base is a {base.get('architecture')}")
        if fp and not force and fp.get("weight_hash") != base.get("weight_hash"):
            raise IncompatibleAdapter(
                f"adapter is for another base: trained on base weights {fp.get('weight_hash')}, the registry's "
                f"base ({self.base_name}) has weights {base.get('weight_hash')} (same shapes: force to accept)")

    # ---------------------------------------------------------------- changes
    def add(self, name: str, src: str | Path, *, description: str = "", force: bool = False,
            skip_if_current: bool = False, max_rank: int | None = None) -> AdapterVersion:
        """Copy adapter directory `src` in as the next version of `name` and make it current. `max_rank`: refuse
        an adapter of a larger rank (a server's --max-lora-rank)."""
        validate_name(name)
        if name.startswith(MIX):
            raise ValueError(f"{name!r}: names starting with {MIX!r} are mixtures (adapters/mixtures.add_mixture)")
        from lorakit.adapters.intake import MAX_JSON_BYTES, adapter_cap, staged_copy, staging_root
        from lorakit.adapters.peft_files import read_adapter, validate_adapter  # torch: only where files are read
        from lorakit.adapters.patterns import STORED_KEY as PATTERNS_KEY, to_json as patterns_json

        caps = {CONFIG_NAME: MAX_JSON_BYTES, WEIGHTS_NAME: adapter_cap(self.require_base())}
        # the copy first: it is what is read, checked, hashed and stored (a source swapped meanwhile changes nothing)
        with staged_copy(src, caps, staging_root(self)) as copy:
            af = read_adapter(copy)  # ValueError / FileNotFoundError for anything unreadable
            validate_adapter(af)  # NaN/inf, ranks, bounds; the base's shapes next (IncompatibleAdapter)
            self.check_fits(af, force)
            ranks = {p: af.config.rank_for(p) for p in af.modules()}
            if max_rank is not None and max(ranks.values()) > max_rank:
                path = max(ranks, key=ranks.get)
                raise ValueError(f"the adapter has rank {ranks[path]} (module {path!r}); this server holds adapters "
                                 f"of rank at most {max_rank} (--max-lora-rank)")
            metrics = af.metadata.get("metrics") if isinstance(af.metadata, dict) else None
            config = af.peft_config  # with its patterns' values per module, so serving never matches them again
            if af.config.resolved is not None:
                config = {**config, PATTERNS_KEY: patterns_json(af.config.resolved)}
            return self.add_version(name, copy, (CONFIG_NAME, WEIGHTS_NAME), fingerprint=af.fingerprint,
                                    config=config, num_params=af.num_params(), description=description,
                                    skip_if_current=skip_if_current, metrics=metrics)

    def add_version(self, name: str, src: Path, files: tuple[str, ...], *, fingerprint: dict | None, config: dict,
                    num_params: int, description: str = "", skip_if_current: bool = False,
                    metrics: dict | None = None) -> AdapterVersion:
        """The shared core of adding (adapters and mixtures, checked by the caller): copy `files` of `src`
        into the store as the next version of `name`, record it and make it current, in one transaction."""
        sha = content_sha256(src, files)
        cur = self._current_row(name)
        if skip_if_current and cur is not None and cur["sha256"] == sha:
            return self.resolve(name)
        self.store.mkdir(parents=True, exist_ok=True)
        with self._write() as db:
            row = db.execute("SELECT next_version FROM adapters WHERE name = ?", (name,)).fetchone()
            now = time.time()
            if row is None:
                db.execute("INSERT INTO adapters (name, description, next_version, created_at) VALUES (?,?,1,?)",
                           (name, description, now))
            top = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0] or 0
            version = max(row["next_version"] if row else 1, top + 1)
            rel = f"{rel_dir(name)}/v{version}"
            dest = self.store / rel
            _copy_files(src, dest, files)
            try:
                db.execute("UPDATE versions SET current = 0 WHERE name = ?", (name,))
                db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,1)",
                           (name, version, rel, sha, json.dumps(fingerprint) if fingerprint else None,
                            json.dumps(config), num_params, now))
                db.execute("UPDATE adapters SET next_version = ? WHERE name = ?", (version + 1, name))
                if description:
                    db.execute("UPDATE adapters SET description = ? WHERE name = ?", (description, name))
                if isinstance(metrics, dict) and metrics:
                    self._insert_eval(db, name, version, metrics, self.base_fp)
                added = self._version_in(db, db.execute("SELECT * FROM versions WHERE name = ? AND version = ?",
                                                        (name, version)).fetchone())
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        return added  # as committed (a removal racing it may drop it at once: resolving again could miss it)

    def rollback(self, name: str, to: int | None = None) -> AdapterVersion:
        """Make version `to` (default: the newest one older than the current) current."""
        validate_name(name)
        cur = self._current_row(name)
        if cur is None:
            raise UnknownAdapter(f"unknown adapter {name!r}")
        with self._write() as db:
            if to is None:
                row = db.execute("SELECT MAX(version) AS v FROM versions WHERE name = ? AND version < ?",
                                 (name, cur["version"])).fetchone()
                if row["v"] is None:
                    raise ValueError(f"adapter {name!r} has no version older than the current v{cur['version']}")
                to = row["v"]
            elif db.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, to)).fetchone() is None:
                raise UnknownAdapter(f"adapter {name!r} has no version {to}; it has {self._versions(db, name)}")
            db.execute("UPDATE versions SET current = (version = ?) WHERE name = ?", (to, name))
        return self.resolve(name)

    def remove(self, ref: str) -> list[AdapterVersion]:
        """Remove 'name' (every version) or 'name@N' (one). Returns what was removed. Only the removed versions'
        folders are deleted, after the commit: version numbers never repeat, so an add of the same name racing
        this removal writes a folder no removal touches."""
        name, version = parse_ref(ref)
        with self._write() as db:  # the adapters row stays: its next_version keeps numbers from repeating
            rows = [r for r in db.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,))
                    if version is None or r["version"] == version]
            if not rows:
                raise UnknownAdapter(f"unknown adapter {ref!r}")
            gone = [self._version_in(db, r) for r in rows]
            if version is None:
                db.execute("DELETE FROM versions WHERE name = ?", (name,))
            else:
                db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
                left = db.execute("SELECT MAX(version) AS v, MAX(current) AS c FROM versions WHERE name = ?",
                                  (name,)).fetchone()
                if left["v"] is not None and not left["c"]:
                    db.execute("UPDATE versions SET current = 1 WHERE name = ? AND version = ?", (name, left["v"]))
            if not db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                db.execute("UPDATE adapters SET description = '' WHERE name = ?", (name,))
        faults.point("registry.removed")
        for v in gone:
            shutil.rmtree(v.path, ignore_errors=True)
        with self._write() as db:  # an add makes the name's folder under this lock: it is empty or in use
            if not db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                with contextlib.suppress(OSError):
                    (self.store / rel_dir(name)).rmdir()
        return gone

    def add_eval(self, ref: str, metrics: dict, base_fp: dict | None = None) -> None:
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"metrics must be a non-empty JSON object, got {metrics!r}")
        v = self.resolve(ref)
        with self._write() as db:
            self._insert_eval(db, v.name, v.version, metrics, base_fp or self.base_fp)

    @staticmethod
    def _insert_eval(db, name, version, metrics, base_fp) -> None:
        fp = base_fp or {}
        db.execute("INSERT INTO evals (name, version, base_shape_hash, base_weight_hash, metrics, created_at) "
                   "VALUES (?,?,?,?,?,?)", (name, version, fp.get("shape_hash"), fp.get("weight_hash"),
                                            json.dumps(metrics), time.time()))

    # ---------------------------------------------------------------- queries
    def _current_row(self, name: str):
        return self._q1("SELECT * FROM versions WHERE name = ? AND current = 1", (name,))

    @staticmethod
    def _versions(db, name) -> list[int]:
        return [r[0] for r in db.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]

    def _version_in(self, db, row) -> AdapterVersion:
        """A version as the open transaction `db` sees it (no second read that a racing change could miss)."""
        evals = db.execute("SELECT * FROM evals WHERE name = ? AND version = ? ORDER BY id",
                           (row["name"], row["version"])).fetchall()
        return self._make_version(row, evals)

    def _row_to_version(self, row) -> AdapterVersion:
        return self._make_version(row, self._q("SELECT * FROM evals WHERE name = ? AND version = ? ORDER BY id",
                                               (row["name"], row["version"])))

    def _make_version(self, row, eval_rows) -> AdapterVersion:
        evals = [{"base_shape_hash": e["base_shape_hash"], "base_weight_hash": e["base_weight_hash"],
                  "metrics": json.loads(e["metrics"]), "created_at": e["created_at"]} for e in eval_rows]
        return AdapterVersion(row["name"], row["version"], self.store / row["path"], row["sha256"],
                              json.loads(row["config"]), json.loads(row["fingerprint"]) if row["fingerprint"] else None,
                              row["num_params"], row["created_at"], bool(row["current"]), evals)

    def local_files(self, v: AdapterVersion) -> Path:
        """The directory to load version `v` from (the slot load validates what it reads). The shared registry
        (registry_pg.py) also re-hashes the files against the recorded content hash here."""
        return v.path

    def resolve(self, ref: str) -> AdapterVersion:
        """'name' (the current version) or 'name@N' -> that version; UnknownAdapter if absent."""
        name, version = parse_ref(ref)
        if version is None:
            row = self._current_row(name)
        else:
            row = self._q1("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise UnknownAdapter(f"unknown adapter {ref!r}" + ("" if version is None or not self.versions(name)
                                 else f"; {name!r} has versions {[v.version for v in self.versions(name)]}"))
        return self._row_to_version(row)

    def versions(self, name: str) -> list[AdapterVersion]:
        validate_name(name)
        return [self._row_to_version(r) for r in
                self._q("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,))]

    def find_sha(self, sha256: str) -> list[AdapterVersion]:
        """Every version (any name) whose files have this content hash."""
        return [self._row_to_version(r) for r in self._q("SELECT * FROM versions WHERE sha256 = ?", (sha256,))]

    def list(self) -> list[AdapterVersion]:
        """The current version of every adapter, by name."""
        return [self._row_to_version(r) for r in self._q("SELECT * FROM versions WHERE current = 1 ORDER BY name")]

    def describe(self, name: str) -> dict:
        vs = self.versions(name)
        if not vs:
            raise UnknownAdapter(f"unknown adapter {name!r}")
        row = self._q1("SELECT description, created_at FROM adapters WHERE name = ?", (name,))
        cur = next(v.version for v in vs if v.current)
        return {"name": name, "description": row["description"], "created_at": row["created_at"],
                "current_version": cur, "versions": [v.to_json() for v in vs]}


def _copy_files(src: Path, dest: Path, files: tuple[str, ...]) -> None:
    """Copy `files` of `src` into `dest` via a temp sibling and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir()
        for f in files:
            shutil.copyfile(src / f, tmp / f)
        if dest.exists():  # a leftover from a crashed add of the same version number
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
