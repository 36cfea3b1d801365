"""What the PostgreSQL race and kill tests check after writers ran: the registry replayed from its
notifications (commit order) equals the database, and the store holds exactly the blobs its rows use, whole;
and how they start the writers (Writers: pg_writer.py's fork server)."""
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from lorakit.adapters.refs import entry_files
from lorakit.adapters.store import verify


def replay(events: list[dict], state: dict[str, dict] | None = None, high: dict[str, int] | None = None):
    """Apply notifications in commit order to {name: {"versions": set, "current": int|None}}, asserting each
    is possible there: an add's number is above every number the name ever had, a rollback names an existing
    version, a removal removes existing versions and leaves the newest current if the current went."""
    state = state if state is not None else {}
    high = high if high is not None else {}
    for e in events:
        s = state.setdefault(e["name"], {"versions": set(), "current": None})
        if e["op"] == "add":
            assert e["version"] > high.get(e["name"], 0), f"version handed out again or out of order: {e}"
            high[e["name"]] = e["version"]
            s["versions"].add(e["version"])
            s["current"] = e["version"]
        elif e["op"] == "rollback":
            assert e["version"] in s["versions"], e
            s["current"] = e["version"]
        elif e["op"] == "remove":
            assert set(e["removed"]) <= s["versions"], (e, s)
            s["versions"] -= set(e["removed"])
            if s["current"] in e["removed"]:
                s["current"] = max(s["versions"]) if s["versions"] else None
            assert e["current"] == s["current"], (e, s)
    return state, high


def db_state(reg) -> dict[str, dict]:
    out = {}
    for r in reg.db.q("SELECT name, version, current FROM versions ORDER BY name, version"):
        s = out.setdefault(r["name"], {"versions": set(), "current": None})
        s["versions"].add(r["version"])
        if r["current"]:
            assert s["current"] is None, f"two current versions of {r['name']}"
            s["current"] = r["version"]
    for name, s in out.items():
        assert s["current"] is not None, f"{name} has versions but none is current"
    return out


def locks_released(conn, timeout: float = 30) -> None:
    """Wait until no other session holds an advisory lock: a killed writer's server process ends a moment after
    its client dies (when it next reads the closed socket), and its locks go with it; before that, an open
    rightly leaves the hash it still holds alone."""
    deadline = time.monotonic() + timeout
    q = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
    while conn.execute(q).fetchone()[0]:
        assert time.monotonic() < deadline, "a killed writer's advisory locks were never released"
        time.sleep(0.01)


def check_store(reg) -> None:
    """Every row's blob is there and hashes to its sha; no other blob and no leftover is in the store."""
    rows = reg.db.q("SELECT name, sha256 FROM versions")
    for r in rows:
        files = entry_files(r["name"])
        verify(reg.store.local_dir(r["sha256"], files), r["sha256"], files)
    assert sorted(reg.store.shas()) == sorted({r["sha256"] for r in rows})
    assert reg.store.leftovers() == []
    counters = {r["name"]: r["next_version"] for r in reg.db.q("SELECT name, next_version FROM adapters")}
    for r in reg.db.q("SELECT name, MAX(version) AS v FROM versions GROUP BY name"):
        assert counters[r["name"]] > r["v"]


HERE = Path(__file__).resolve().parent


class Writers:
    """Writer processes forked by pg_writer.py's fork server (torch and lorakit imported once for all)."""

    def __init__(self, url: str, root: Path):
        self.root, self.n, self.err = root, 0, root / "writers.err"
        env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
        env.pop("LORAKIT_FAULT", None)  # each child arms its own
        with open(self.err, "w") as err:
            self.p = subprocess.Popen([sys.executable, str(HERE / "pg_writer.py"), "forks", url], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def start(self, jobs: list[tuple[str | None, list[str]]]) -> list[Path]:
        """Fork one writer per (fault, args); returns the files their reports go to."""
        batch = []
        for fault, args in jobs:
            self.n += 1
            batch.append({"fault": fault, "args": [str(a) for a in args], "out": str(self.root / f"writer{self.n}")})
        self.p.stdin.write(json.dumps(batch) + "\n")
        self.p.stdin.flush()
        return [Path(j["out"]) for j in batch]

    def wait(self, timeout: float = 600) -> list[int]:
        """The exit codes of the last batch (minus the signal for a killed writer)."""
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if ready else ""
        assert line, f"the fork server did not answer: {self.errors()}"
        return json.loads(line)

    def until_ready(self, outs: list[Path], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for out in outs:
            while not (out.exists() and out.read_text().endswith("\n")):
                assert time.monotonic() < deadline and self.p.poll() is None, f"{out} not ready: {self.errors()}"
                time.sleep(0.01)

    def errors(self) -> str:
        return self.err.read_text()[-3000:]

    @staticmethod
    def reports(out: Path) -> list[dict]:
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(30)
        finally:
            self.p.kill()
