import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture()
def one_thread():
    """Torch on one thread for the test (tiny models on a shared machine), the previous count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def spawn_two():
    """``spawn_two(worker, *args)``: run ``worker(rank, *args)`` in two spawned processes (gloo on CPU); skips the
    test where torch.distributed, gloo or FSDP2 is missing."""
    dist = pytest.importorskip("torch.distributed")
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    return lambda worker, *args: mp.start_processes(worker, args=args, nprocs=2, start_method="spawn")
