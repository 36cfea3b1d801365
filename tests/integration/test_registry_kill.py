"""kill -9 during registration, 10 trials: after each, opening the registry finds it consistent (every
row's files present and matching their hash, nothing partial or unrecorded in the store), nothing that was
reported added is lost, and no version number is ever handed out twice."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint, read_adapter, validate_adapter
from lorakit.adapters.registry import Registry
from lorakit.models import tiny_llama

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[2] / "src")
CHILD = """
import sys
from lorakit.adapters.registry import Registry
reg = Registry(sys.argv[1])
i = 0
while True:  # add, add, remove the older of the two, ...: every change reported once it returned
    v = reg.add("k", sys.argv[2 + i % 2])
    print("add", v.version, flush=True)
    if i % 2:
        print("removing", v.version - 1, flush=True)
        reg.remove(f"k@{v.version - 1}")
        print("rm", v.version - 1, flush=True)
    i += 1
"""


def _sha(d: Path) -> str:
    h = hashlib.sha256()
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        h.update((d / f).read_bytes())
    return h.hexdigest()


def test_kill_9_during_registration(tmp_path, caplog):
    base = tiny_llama()
    srcs = []
    for seed in (1, 2):  # ~0.6 MB each, so that a kill often lands inside a copy
        m = tiny_llama()
        torch.manual_seed(seed)
        add_adapter(m, LoraConfig(r=64, alpha=64, targets="all-linear", init_lora_weights=False))
        srcs.append(save_adapter(m, tmp_path / f"src{seed}"))
    Registry(tmp_path / "r.sqlite", base_fp=fingerprint(base), base_name="tiny").close()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    handed_out: set[int] = set()
    present: set[int] = set()
    cleaned = 0  # trials whose kill left something for the next open to remove
    for trial in range(10):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "r.sqlite"), *map(str, srcs)],
                             env=env, stdout=subprocess.PIPE, text=True)
        try:
            first = p.stdout.readline()  # it is adding now
            assert first.startswith("add"), first
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(p.pid, signal.SIGKILL)
            out = first + p.communicate(timeout=30)[0]
        maybe = None  # a removal that started but was not reported done: either outcome is right
        for line in out.splitlines():
            if len(line.split()) != 2:  # the kill cut this report line short
                continue
            op, n = line.split()
            if op == "add":
                assert int(n) not in handed_out, f"trial {trial}: version {n} handed out twice"
                handed_out.add(int(n))
                present.add(int(n))
            elif op == "removing":
                maybe = int(n)
            else:
                present.discard(int(n))
                maybe = None
        present.discard(maybe)
        caplog.clear()
        reg = Registry(tmp_path / "r.sqlite")  # opening cleans up what the kill left
        cleaned += sum("leftover" in r.getMessage() for r in caplog.records)
        rows = reg.versions("k")
        versions = {v.version for v in rows}
        assert present <= versions, f"trial {trial}: lost {present - versions}"
        assert sum(v.current for v in rows) == 1
        for v in rows:  # every row's files are whole and are what was registered
            assert _sha(v.path) == v.sha256 in {_sha(s) for s in srcs}
            validate_adapter(read_adapter(v.path), reg.base_fp)
        on_disk = sorted(p.name for p in (reg.store / "k").iterdir())
        assert on_disk == sorted(f"v{n}" for n in versions), f"trial {trial}: {on_disk}"
        present = versions
        handed_out |= versions
        reg.close()
    assert len(handed_out) >= 10
    print(f"{cleaned} of 10 kills left a temp or unrecorded directory behind")
