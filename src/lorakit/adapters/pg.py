"""PostgreSQL plumbing for the registry (psycopg 3): a read connection and a write connection shared by the
threads of one process, transactions retried on serialization failures and deadlocks, URLs shown without
their password. psycopg is the `postgres` extra: pip install 'lorakit[postgres]'."""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("lorakit.registry")
CHANNEL = "lorakit_registry"  # every committed registry change is NOTIFY'd here (registry_watch.py listens)


class RegistryUnavailable(ValueError):
    """The database cannot be reached (or dropped the connection twice): HTTP 503."""


def is_url(spec: str | Path) -> bool:
    return str(spec).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and the dashboard."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def sha_lock(sha: str) -> int:
    """The advisory lock key of a content hash: its first 60 bits, a positive bigint."""
    return int(sha[:15], 16)


class Pg:
    def __init__(self, url: str, connect_timeout: float = 10):
        try:
            import psycopg
        except ImportError:
            raise ValueError(f"registry {redact(url)!r} is PostgreSQL: install psycopg (pip install "
                             "'lorakit[postgres]')") from None
        self.psycopg, self.url, self.shown = psycopg, url, redact(url)
        self.connect_timeout = connect_timeout
        self._rlock, self._wlock = threading.Lock(), threading.Lock()
        self._reader = self._writer = None

    def connect(self):
        from psycopg.rows import dict_row

        try:
            return self.psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                        connect_timeout=max(1, int(self.connect_timeout)))
        except self.psycopg.OperationalError as e:
            raise RegistryUnavailable(f"cannot reach the PostgreSQL registry {self.shown!r}: {str(e).strip()}") from None

    def q(self, sql: str, args=()) -> list[dict]:
        """A read on the shared read connection (autocommit: each read sees the last commit); reconnects once if
        the server dropped it."""
        with self._rlock:
            for attempt in (0, 1):
                try:
                    if self._reader is None or self._reader.closed:
                        self._reader = self.connect()
                    return self._reader.execute(sql, args).fetchall()
                except self.psycopg.OperationalError as e:
                    self._reader = None
                    if attempt:
                        raise RegistryUnavailable(f"the PostgreSQL registry {self.shown!r} dropped the "
                                                  f"connection: {str(e).strip()}") from None

    def q1(self, sql: str, args=()):
        rows = self.q(sql, args)
        return rows[0] if rows else None

    @contextmanager
    def tx(self):
        """One transaction (READ COMMITTED) on the write connection; the cursor returns dict rows."""
        with self._wlock:
            try:  # a connection the server dropped meanwhile (a restart) is replaced before anything is sent
                self._writer.execute("SELECT 1")
            except (AttributeError, self.psycopg.Error):
                if self._writer is not None:
                    self._writer.close()
                self._writer = self.connect()
            try:
                with self._writer.transaction():
                    yield self._writer.cursor()
            except self.psycopg.OperationalError:
                self._writer = None  # lost mid-change: the server rolled it back
                raise

    def write(self, fn, attempts: int = 5):
        """fn(cursor) in one transaction, retried with backoff on a serialization failure or deadlock."""
        errors = self.psycopg.errors
        for attempt in range(attempts):
            try:
                with self.tx() as cur:
                    return fn(cur)
            except (errors.SerializationFailure, errors.DeadlockDetected) as e:
                if attempt == attempts - 1:
                    raise
                log.info("registry change retried after %s", type(e).__name__)
                time.sleep(random.uniform(0, 0.02 * 2 ** attempt))

    def close(self) -> None:
        for lock, attr in ((self._rlock, "_reader"), (self._wlock, "_writer")):
            with lock:
                conn = getattr(self, attr)
                if conn is not None:
                    conn.close()
                    setattr(self, attr, None)
