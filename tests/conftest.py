"""Test-suite settings: one intra-op thread (this CI machine has 2 cores and tests run small tensors, where extra
threads only add contention), and a per-session data cache so tests never depend on a user's ~/.cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_configure(config: pytest.Config) -> None:
    # Generated MNIST-1D arrays are cached; keep CI's cache inside the repository's ignored folder when unset.
    os.environ.setdefault("MENTOR_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "mentor"))
