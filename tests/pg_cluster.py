"""A throwaway PostgreSQL cluster for the registry tests: initdb + pg_ctl on a temporary directory, reached
only through a Unix socket in that directory (no TCP port, so parallel runs cannot collide), fsync off.

PostgreSQL refuses to run as root: as root the cluster runs as a non-root system user ($LORAKIT_PG_USER,
default `postgres`, which Debian's package creates) through `runuser`. Tests that need it are skipped, with
the reason, where PostgreSQL, that user or psycopg is missing (scripts/install_postgresql.sh installs
Debian's package; .ci/run calls it)."""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


class Unavailable(Exception):
    """Why the cluster cannot be started here (the tests skip with this reason)."""


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return cands[-1] if cands else None


class Cluster:
    def __init__(self):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install 'lorakit[postgres]')") from None
        initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not self.pg_ctl:
            raise Unavailable("PostgreSQL is not installed (no initdb/pg_ctl on PATH or under "
                              "/usr/lib/postgresql/*/bin): apt-get install postgresql (scripts/install_postgresql.sh)")
        self.dir = Path(tempfile.mkdtemp(prefix="lorakit-pg-"))
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            user = os.environ.get("LORAKIT_PG_USER", "postgres")
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                shutil.rmtree(self.dir)
                raise Unavailable(f"running as root, PostgreSQL needs a non-root user to run as: no user {user!r} "
                                  "(Debian's postgresql package creates 'postgres'; or set LORAKIT_PG_USER)") from None
            if not shutil.which("runuser"):
                shutil.rmtree(self.dir)
                raise Unavailable("running as root without runuser (util-linux) to start PostgreSQL as another user")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.run_as = ["runuser", "-u", user, "--"]
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self._run([initdb, "-D", str(self.data), "-U", "lorakit", "--auth=trust", "-E", "UTF8", "--locale=C",
                   "--no-sync"])
        self._names = itertools.count()
        self.start_server()

    def start_server(self) -> None:
        opts = (f"-k {self.dir} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
                "-c synchronous_commit=off -c max_connections=300")
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                   "-o", opts, "start"])

    def stop_server(self) -> None:
        """The database goes away (clients' connections are cut); start_server() brings it back, data kept."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def _run(self, cmd: list[str]) -> None:
        p = subprocess.run(self.run_as + cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(f"{' '.join(cmd[:1])} failed ({p.returncode}): {p.stderr.strip()}\n"
                               + (log.read_text()[-2000:] if log.exists() else ""))

    def url(self, db: str) -> str:
        return f"postgresql://lorakit@/{db}?host={self.dir}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
