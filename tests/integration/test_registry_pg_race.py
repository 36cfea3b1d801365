"""Four processes race add / rollback / remove on two names of one PostgreSQL registry (a real server, a
throwaway cluster). Afterwards the changes, replayed in commit order from their notifications, are each
possible where they happened (numbers only ever grow, rollbacks and removals name existing versions) and end
in exactly the database's state; no version number is handed out twice, none is removed twice, every
reported add is present or was reported removed; the store holds exactly the blobs the rows use, whole."""
import json
from pathlib import Path

import psycopg
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import fingerprint
from lorakit.adapters.pg import CHANNEL
from lorakit.adapters.registry_pg import PgRegistry
from lorakit.models import tiny_llama

from pg_checks import Writers, check_store, db_state, replay

WRITERS, OPS = 4, 30


def _sources(root: Path) -> list[Path]:
    out = []
    for seed in (1, 2, 3):
        m = tiny_llama()
        torch.manual_seed(seed)
        add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
        out.append(save_adapter(m, root / f"src{seed}"))
    return out


def test_four_writers_race(tmp_path, pg_url):
    srcs = _sources(tmp_path)
    PgRegistry(pg_url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=tmp_path / "store").close()
    listen = psycopg.connect(pg_url, autocommit=True)
    listen.execute(f"LISTEN {CHANNEL}")
    go = tmp_path / "go"
    with Writers(pg_url, tmp_path) as writers:  # four processes, forked from one that imported torch and lorakit
        outs = writers.start([(None, ["race", i, OPS, go, *srcs]) for i in range(WRITERS)])
        writers.until_ready(outs)
        go.touch()  # all start together
        codes = writers.wait(600)
    assert codes == [0] * WRITERS, writers.errors()
    reported = [r for out in outs for r in writers.reports(out) if r["op"] != "ready"]
    changes = [r for r in reported if r["op"] != "refused"]
    events = []
    for n in listen.notifies(timeout=30, stop_after=len(changes)):
        events.append(json.loads(n.payload))
    events += [json.loads(n.payload) for n in listen.notifies(timeout=0.5)]  # nothing more may come
    listen.close()
    assert len(events) == len(changes), "every committed change is notified once, and only those"
    adds = [(r["name"], r["version"]) for r in changes if r["op"] == "add"]
    assert len(adds) == len(set(adds)) >= 10, "a version number handed out twice"
    removed = [(r["name"], v) for r in changes if r["op"] == "remove" for v in r["removed"]]
    assert len(removed) == len(set(removed)), "a version removed twice"
    assert sum(r["op"] == "rollback" for r in changes) >= 5 and len(removed) >= 5
    state, _ = replay(events)
    reg = PgRegistry(pg_url)
    try:
        got = db_state(reg)
        assert {n: s for n, s in state.items() if s["versions"]} == got
        assert set(adds) - set(removed) == {(n, v) for n, s in got.items() for v in s["versions"]}
        check_store(reg)
    finally:
        reg.close()
    print(f"{len(changes)} changes ({len(adds)} adds, {len(removed)} versions removed), "
          f"{len(reported) - len(changes)} refused after losing a race")
