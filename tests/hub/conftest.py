"""The tests here build full-size ResNets and compare a few small forward passes; one intra-op thread keeps them
fast and steady on a busy machine (OpenMP threads waiting on each other dominate otherwise)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
