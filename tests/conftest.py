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
