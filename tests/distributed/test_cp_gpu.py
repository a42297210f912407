"""Context parallelism over NCCL on 2 and 4 GPUs: the Triton kernels split across GPUs against the same kernels
on one GPU (bf16, relative RMS error <= 3e-3 for every output and every gradient).

Gates decay weakly (decay_strength 0.02: a state lives thousands of tokens), so the states handed between GPUs
shape most outputs; with the usual strong gates a state is forgotten within a chunk or two and a broken hand-off
would hide. log_atk_scale is an fp32 parameter, as in mixed-precision training: its gradient is a sum over all
tokens, and in bf16 the per-GPU partial sums alone would differ from one GPU's by ~2^-9.

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
# zigzag_per_sequence cuts every sequence into 2*CP equal pieces: Megatron pads THD sequences to a multiple of it
PADDED_CU = [0, 3000, 9000, 9008, 12000, 16384]


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
    B, T, cu = CASES[case]
    if layout == "zigzag" and cu is not None:  # Megatron's THD: every packed sequence zigzag-split on its own
        layout, cu = "zigzag_per_sequence", PADDED_CU
    check_cp(nccl_groups, cp, variant, layout, (B, T, cu), torch.bfloat16, 3e-3, HV=8, H=4, K=128, V=128,
             device="cuda", backend="triton", ref_backend="triton", decay_strength=0.02, fp32_params=True)
