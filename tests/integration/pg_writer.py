"""A registry writer process for the PostgreSQL race and kill tests: prints one JSON line per change once it
returned (so the test knows what was committed and reported), nothing else on stdout.

    python pg_writer.py race URL SEED N_OPS GO_FILE SRC...   random add / rollback / remove on names n0, n1
    python pg_writer.py steps URL FRESH COMMON               add k FRESH; add k COMMON; rollback k; remove k@<FRESH's>
"""
import json
import os
import random
import sys
import time

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


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    reg = PgRegistry(url)
    if mode == "race":
        race(reg, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    else:
        steps(reg, sys.argv[3], sys.argv[4])
    reg.close()
