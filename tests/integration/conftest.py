"""What the serving-engine tests share: `start_engine`, the one way they start an engine."""
import pytest


@pytest.fixture
def start_engine():
    """start_engine(max_slots=2, max_batch=4, model=None) -> a started serving Engine on `model` (default: a fresh
    tiny Llama) with the embedded tokenizer's stand-in (engine_helpers.TOK); every engine a test starts is stopped
    after it, passed or failed."""
    from engine_helpers import TOK

    from lorakit.models import tiny_llama
    from lorakit.serve.engine import Engine

    started = []

    def start(max_slots: int = 2, max_batch: int = 4, model=None, **kw) -> Engine:
        started.append(Engine(model if model is not None else tiny_llama(), TOK, max_slots=max_slots,
                              max_batch=max_batch, **kw).start())
        return started[-1]

    yield start
    for eng in started:
        eng.stop()
