"""Greedy output through the server == offline `generate`, token for token, on the embedded model,
with two different adapters (a DoRA one and a plain LoRA one) and the base decoded together in the same forward
passes."""
import threading
import time

import openai
import pytest
import torch

from lorakit import LoraConfig, add_adapter, delete_adapter, load_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import fingerprint
from lorakit.config import ServeConfig
from lorakit.generate import generate
from lorakit.models import load_base
from lorakit.serve.app import ServerThread, build_app, make_state
from lorakit.adapters.registry import Registry

pytestmark = pytest.mark.slow
PROMPTS = [[{"role": "user", "content": "Write a haiku about the sea."}]]
N = 16


def _make_adapter(model, path, cfg, seed):
    torch.manual_seed(seed)
    add_adapter(model, cfg, "x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    save_adapter(model, path, "x")
    delete_adapter(model, "x")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other test runs, 2 threads oversubscribe
    the cores and run ~4x slower; alone, 1 thread costs this test little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_server_greedy_equals_offline_generate(tmp_path, embedded, one_thread):
    ref, tok = embedded
    _make_adapter(ref, tmp_path / "tone", LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "o_proj"],
                                                     use_dora=True), 1)
    _make_adapter(ref, tmp_path / "domain", LoraConfig(r=16, alpha=16, targets="all-linear"), 2)
    want = {"SmolLM2-135M-Instruct": generate(ref, tok, PROMPTS, max_new_tokens=N)}
    for name in ("tone", "domain"):
        load_adapter(ref, tmp_path / name, name)
        set_active(ref, name)
        want[name] = generate(ref, tok, PROMPTS, max_new_tokens=N)
        set_active(ref, None)
        delete_adapter(ref, name)
    assert len({tuple(w) for w in want.values()}) == 3, want  # each adapter changes what the model says

    model, tok = load_base("embedded", dtype="float32", device="cpu")  # the server's own copy
    reg = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(model), base_name="SmolLM2-135M-Instruct")
    for name in ("tone", "domain"):
        reg.add(name, tmp_path / name)
    state = make_state(model, tok, reg, ServeConfig(api_keys=["k"], max_slots=2), "SmolLM2-135M-Instruct")
    server = ServerThread(build_app(state)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=120)
        jobs = [(m, i) for m in want for i in range(len(PROMPTS))]
        got: dict = {}

        def ask(m, i):
            r = client.chat.completions.create(model=m, messages=PROMPTS[i], max_tokens=N, temperature=0)
            got[(m, i)] = r.choices[0].message.content

        gate = threading.Event()
        state.engine.call(gate.wait)  # hold the engine so all six requests join one batch
        threads = [threading.Thread(target=ask, args=j) for j in jobs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(state.engine.waiting) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(120)
        assert state.engine.stats["max_rows"] == len(jobs)
        for m, i in jobs:
            assert got[(m, i)] == want[m][i], (m, i)
    finally:
        server.stop()
        state.engine.stop()
        reg.close()
