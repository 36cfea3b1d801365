import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny():
    from lorakit.models import tiny_llama

    return tiny_llama()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 12), generator=g)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M (fp32, CPU), loaded once per session."""
    from lorakit.models import load_base

    return load_base("embedded", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face model dir, with the embedded model's tokenizer
    (vocab 49152, chat template), so the CLI can load it like any local model."""
    from transformers import AutoTokenizer

    from lorakit.models import embedded_dir, tiny_llama

    tok = AutoTokenizer.from_pretrained(embedded_dir())
    model = tiny_llama(vocab_size=len(tok), init_std=0.2)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """`slow` by where a test lives or what it declares, never by reading its source: everything under
    tests/integration and tests/browser (servers, subprocesses, the CLI end to end), and every test that asks for
    the `embedded` fixture. Other slow tests carry @pytest.mark.slow themselves. `pytest -m "not slow"` is the
    quick loop (under 2 minutes on 2 cores)."""
    for item in items:
        if ({"integration", "browser"} & set(item.path.parts)
                or "embedded" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session (tests/pg_cluster.py); skips with the reason if absent."""
    from pg_cluster import Cluster, Unavailable

    try:
        cluster = Cluster()
    except Unavailable as e:
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a fresh, empty database in the session's cluster."""
    return pg_cluster.new_database()
