"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on CPU. On this 2-core machine 2 threads are ~1.8x faster when it is idle, but ~10x
    slower when another process is busy (OpenMP synchronisation: 40 CLIP steps took 25 s vs 2.7 s, the
    test probe 53 s vs 4.4 s); one thread keeps the suite inside its time budget either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
