"""Context parallelism over NCCL on 2 and 4 GPUs: the Triton kernels split across GPUs against the same kernels
on one GPU (bf16, relative RMS error <= 3e-3 for every output and every gradient).

Run on a machine with several GPUs (skipped elsewhere):
    torchrun --nproc-per-node 4 -m pytest -q -m gpu tests/distributed/test_cp_gpu.py
"""
import os

import pytest
import torch
import torch.distributed as dist

from test_cp import check_cp  # tests/distributed is on sys.path (rootdir-relative import)

pytestmark = [pytest.mark.distributed, pytest.mark.gpu]

CASES = {  # name: (B, T_global, cu_seqlens or None)
    "one_stream_16k": (1, 16384, None),
    "batch_2x8k": (2, 8192, None),
    "varlen_16k": (1, 16384, [0, 3000, 9000, 9001, 12000, 16384]),
}


@pytest.fixture(scope="session")
def nccl_groups(world):
    """{cp_size: (NCCL group holding this rank, rank in it)} for 2 and 4 dividing the world; skips without GPUs."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip("needs one CUDA device per rank")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    rank, groups = dist.get_rank(), {1: (None, 0)}
    for size in (2, 4):
        if world % size:
            continue
        for first in range(0, world, size):  # every rank creates every group, in the same order
            ranks = list(range(first, first + size))
            group = dist.new_group(ranks, backend="nccl")
            if rank in ranks:
                groups[size] = (group, rank - first)
    return groups


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_gpu_matches_one_gpu(nccl_groups, cp, variant, layout, case):
    if layout == "zigzag" and CASES[case][2] is not None:
        layout = "zigzag_per_sequence"  # Megatron's THD: every packed sequence zigzag-split on its own
    check_cp(nccl_groups, cp, variant, layout, CASES[case], torch.bfloat16, 3e-3, HV=8, H=4, K=128, V=128,
             device="cuda", backend="triton", ref_backend="triton")
