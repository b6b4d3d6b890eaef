import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run the head tests single-threaded: on a shared 2-core machine, two intra-op threads per
    process oversubscribe the cores and made these small-tensor workloads ~10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
