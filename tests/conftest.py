import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is much faster than two on a busy machine (no OpenMP spinning).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
