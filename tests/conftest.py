import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Every test starts from the same seed, on one intra-op thread: the tests use tiny models, for which
    thread hand-offs cost more than they save (several times slower with 2 threads on a busy 2-core box)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
