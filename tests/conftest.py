"""Shared pytest setup: offline Hugging Face, a fixed seed per test, the tests folder importable."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Helpers such as fp64_oracle live beside the tests: make them importable whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def generator() -> torch.Generator:
    """A private CPU generator, seeded, for tests that want their own random stream."""
    return torch.Generator().manual_seed(1234)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
