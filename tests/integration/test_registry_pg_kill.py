"""kill -9 of a PostgreSQL registry writer at named points (lorakit/faults.py), 10 trials, one point each:
inside an add (name locked, blob copied, blob in place, row written, committed), a rollback and a removal
(before and after its commit, while its unused blob is deleted). After each kill: the change is there whole
exactly when the kill came after its commit, and otherwise absent; only committed changes were notified;
opening the registry leaves the store holding exactly the blobs the rows use, whole; no number is handed out
twice. The writer runs `add k FRESH; add k COMMON; rollback k; remove k@<FRESH's>` (pg_writer.py steps), so
every point is on its path whatever the earlier trials left."""
import json
import signal
from pathlib import Path

import psycopg
import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import fingerprint
from lorakit.adapters.pg import CHANNEL
from lorakit.adapters.registry_pg import PgRegistry
from lorakit.models import tiny_llama

from pg_checks import Writers, check_store, db_state, locks_released, replay

# point -> which of the writer's 4 changes it kills, and whether that change is committed when it dies
POINTS = [("registry.add.locked", 0, False), ("registry.store.copied", 0, False),
          ("registry.add.blob_written", 0, False), ("registry.add.before_commit", 0, False),
          ("registry.add.committed", 0, True), ("registry.rollback.before_commit", 2, False),
          ("registry.remove.before_commit", 3, False), ("registry.remove.committed", 3, True),
          ("registry.gc.deleting", 3, True), ("registry.store.trashed", 3, True)]
# kills that leave something in the store for the next open to remove: a temp copy, a blob no committed row
# uses, the trash of a deletion
LEAVE = {"registry.store.copied", "registry.add.blob_written", "registry.add.before_commit",
         "registry.remove.committed", "registry.gc.deleting", "registry.store.trashed"}


def _adapter(path: Path, seed: int) -> Path:
    m = tiny_llama()
    torch.manual_seed(seed)
    add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
    return save_adapter(m, path)


def test_kill_9_at_named_points(tmp_path, pg_url, caplog):
    common = _adapter(tmp_path / "common", 0)
    PgRegistry(pg_url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=tmp_path / "store").close()
    listen = psycopg.connect(pg_url, autocommit=True)
    listen.execute(f"LISTEN {CHANNEL}")
    state, high = {}, {}
    with Writers(pg_url, tmp_path) as writers:
        for trial, (point, killed_step, committed) in enumerate(POINTS):
            fresh = _adapter(tmp_path / f"fresh{trial}", 100 + trial)
            [out] = writers.start([(f"{point}:kill", ["steps", fresh, common])])
            [code] = writers.wait(300)
            assert code == -signal.SIGKILL, f"{point}: not killed there (exit {code}): {writers.errors()}"
            done = writers.reports(out)
            assert len(done) == killed_step, f"{point}: reported {done}"
            before = {n: {"versions": set(s["versions"]), "current": s["current"]} for n, s in state.items()}
            expect = killed_step + committed
            events = [json.loads(n.payload) for n in listen.notifies(timeout=2, stop_after=expect)] if expect else []
            events += [json.loads(n.payload) for n in listen.notifies(timeout=0.3)]  # and nothing more
            assert len(events) == expect, f"{point}: notified {events}"
            state, high = replay(events, state, high)  # numbers grow across trials: never handed out twice
            locks_released(listen)
            caplog.clear()
            reg = PgRegistry(pg_url)  # opening collects what the kill left in the store
            cleaned = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
            assert bool(cleaned) == (point in LEAVE), f"{point}: {cleaned}"
            try:
                got = db_state(reg)
                assert got == {n: s for n, s in state.items() if s["versions"]}, f"{point}: {got} vs {state}"
                empty = {"versions": set(), "current": None}
                k_before, k_now = before.get("k", empty), state.get("k", empty)
                if killed_step == 0:  # the fresh add: there whole, or not at all
                    new = k_now["versions"] - k_before["versions"]
                    assert (len(new) == 1 and k_now["current"] == max(new)) if committed else not new, point
                elif killed_step == 2:  # the rollback did not happen: the common add is still current
                    assert k_now["current"] == max(k_now["versions"]), point
                else:  # the removal of the fresh version: done exactly when committed
                    fresh_v = done[0]["version"]
                    assert (fresh_v not in k_now["versions"]) == committed, point
                check_store(reg)
            finally:
                reg.close()
    listen.close()
    assert len(high) == 1 and high["k"] >= 10
