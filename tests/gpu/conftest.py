"""Every test under tests/gpu needs a CUDA device: marked `gpu` here, and skipped, with the reason, where torch
sees none (the files still import and collect on a CPU machine). What the tests share is in gpu_helpers.py."""
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
