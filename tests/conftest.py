"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """One intra-op thread: on a small, shared CPU, OpenMP oversubscription makes a 384 x 384 SVD
    or a MiniLM backward pass about 100x slower (seconds instead of tens of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
