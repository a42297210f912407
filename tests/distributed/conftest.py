"""One process group per torchrun launch; CP groups of every size that divides the world."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="session")
def world():
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1)):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            backend = "cpu:gloo,cuda:nccl"  # CUDA tensors travel over NCCL (GPU tests), CPU ones over gloo
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
    yield dist.get_world_size()


@pytest.fixture(scope="session")
def cp_groups(world):
    """{cp_size: (group containing this rank, rank in it)} for cp_size in 1, 2, 4 dividing the world size."""
    rank = dist.get_rank()
    groups = {}
    for size in (1, 2, 4):
        if world % size:
            continue
        for first in range(0, world, size):
            ranks = list(range(first, first + size))
            group = dist.new_group(ranks) if size < world else dist.group.WORLD
            if rank in ranks:
                groups[size] = (group, rank - first)
    return groups


def pytest_sessionfinish(session, exitstatus):
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
