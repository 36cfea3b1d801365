"""A registry writer process for the PostgreSQL race and kill tests: prints one JSON line per change once it
returned (so the test knows what was committed and reported), nothing else on stdout.

    python pg_writer.py race URL SEED N_OPS GO_FILE SRC...   random add / rollback / remove on names n0, n1
    python pg_writer.py steps URL FRESH COMMON               add k FRESH; add k COMMON; rollback k; remove k@<FRESH's>
    python pg_writer.py forks URL                            the fork server the tests use (fork_server)
"""
import json
import os
import random
import sys
import time
import traceback

from lorakit import faults
from lorakit.adapters.registry import UnknownAdapter
from lorakit.adapters.registry_pg import PgRegistry


def say(**kw):
    print(json.dumps(kw), flush=True)


def race(reg, seed: int, n_ops: int, go: str, srcs: list[str]) -> None:
    rng = random.Random(seed)
    say(op="ready")
    while not os.path.exists(go):  # all writers start together
        time.sleep(0.001)
    for _ in range(n_ops):
        name = rng.choice(["n0", "n1"])
        r = rng.random()
        try:
            if r < 0.45:
                v = reg.add(name, rng.choice(srcs))
                say(op="add", name=name, version=v.version, sha=v.sha256)
            elif r < 0.7:
                have = [v.version for v in reg.versions(name)]
                to = rng.choice(have) if have and rng.random() < 0.5 else None
                v = reg.rollback(name, to)
                say(op="rollback", name=name, current=v.version)
            elif r < 0.92:
                have = [v.version for v in reg.versions(name)]
                if not have:
                    continue
                gone = reg.remove(f"{name}@{rng.choice(have)}")
                say(op="remove", name=name, removed=[v.version for v in gone])
            else:
                gone = reg.remove(name)
                say(op="remove", name=name, removed=[v.version for v in gone])
        except (UnknownAdapter, ValueError) as e:  # lost a race (version gone, nothing older): refused, no change
            say(op="refused", name=name, error=str(e)[:200])


def steps(reg, fresh: str, common: str) -> None:
    v = reg.add("k", fresh)
    say(op="add", name="k", version=v.version, sha=v.sha256)
    w = reg.add("k", common)
    say(op="add", name="k", version=w.version, sha=w.sha256)
    c = reg.rollback("k")
    say(op="rollback", name="k", current=c.version)
    gone = reg.remove(f"k@{v.version}")
    say(op="remove", name="k", removed=[g.version for g in gone])


def run(url: str, mode: str, args: list[str]) -> None:
    reg = PgRegistry(url)
    if mode == "race":
        race(reg, int(args[0]), int(args[1]), args[2], args[3:])
    else:
        steps(reg, args[0], args[1])
    reg.close()


def fork_server(url: str) -> None:
    """Writers forked from this process, which imports torch and lorakit once (seconds each on a loaded
    2-core machine) instead of once per writer. Reads batches from stdin, one JSON line each:
    [{"fault": LORAKIT_FAULT spec or null, "args": [mode, ...], "out": path}, ...]; forks one child per job
    (its stdout goes to `out`), waits for all of them and prints their exit codes as one JSON line (minus the
    signal for a killed one, as subprocess reports it). Each child is a process of its own: its own database
    connection (this one opens none), killed alone by its fault."""
    from lorakit.adapters import peft_files  # noqa: F401  (torch: what every add reads files with)

    for line in sys.stdin:
        pids = []
        for job in json.loads(line):
            pid = os.fork()
            if pid == 0:
                _child(url, job)
            pids.append(pid)
        print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]), flush=True)


def _child(url: str, job: dict) -> None:
    code = 1
    try:
        random.seed()  # not the parent's sequence: retries' backoff jitter differs between writers
        faults.arm(job["fault"])
        sys.stdout = open(job["out"], "w")
        run(url, job["args"][0], job["args"][1:])
        sys.stdout.flush()
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "forks":
        fork_server(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[1], sys.argv[3:])
