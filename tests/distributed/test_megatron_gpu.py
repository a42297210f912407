"""Megatron-core on 2 GPUs (NCCL, bf16 autocast, Triton kernels): a block of our mixers and the GPT builder under
TP=1 CP=2 against TP=1 CP=1.

    torchrun --nproc-per-node 2 -m pytest -q -s -m gpu tests/distributed/test_megatron_gpu.py

Parameters stay fp32; activations and the op run in bf16 (autocast). Outputs and per-token losses must match the
one-GPU run within 3e-3 relative RMS. Parameter gradients are sums over all tokens of bf16 per-token terms that
largely cancel, so two bf16 runs differ by more than their per-token terms (measured on 2 H200: 1-2e-2 from
float64 for gate parameters of 4 entries, while outputs agree to 3e-4). The test therefore asks what matters:
under CP the gradients are as close to the float64 answer (the same model in float64, PyTorch backend, one GPU) as
the one-GPU bf16 gradients are. Per parameter that ratio is noisy (a 4-entry gate parameter measured 1.7x on one
seed, 1.06x on another), so the bound is on the mean ratio over all parameters (<= 1.3) with a per-parameter
guard of max(3e-3, 3x the one-GPU error) that a wrong state hand-off (errors of order 1) cannot pass.
"""
import os

import pytest
import torch

megatron = pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock  # noqa: E402
from test_megatron import _config as megatron_config  # noqa: E402  (tests/distributed is on sys.path)

from pdelta_cp.cp.layout import shard  # noqa: E402
from pdelta_cp.megatron_patches.specs import build_gpt_model, pdelta_block_spec  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.gpu]
S, B, D = 4096, 1, 512  # 4 heads of 128 (the shared config's head count), as in the kernel benchmarks
TOL = 3e-3


@pytest.fixture(scope="module")
def cuda(world):
    if os.environ.get("PDELTA_GPU_TEST_ON_CPU") == "1":  # dry run of the test logic on CPU (torch backend)
        return torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip("needs one CUDA device per rank")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


def _grads(module, scalar):
    names = [n for n, _ in module.named_parameters()]
    return dict(zip(names, torch.autograd.grad(scalar, [p for _, p in module.named_parameters()])))


def _run_three(build, forward, cuda):
    """{(cp, precision): (per-token output, grads)} for (1, fp64), (1, bf16), (2, bf16); outputs gathered whole."""
    runs = {}
    for cp, precision in ((1, "fp64"), (1, "bf16"), (2, "bf16")):
        module = build(megatron_config(1, cp, hidden=D, device=cuda)).to(cuda)
        if precision == "fp64":
            module = module.double()
        rank = parallel_state.get_context_parallel_rank()
        with torch.autocast(cuda.type, dtype=torch.bfloat16, enabled=precision == "bf16" and cuda.type == "cuda"):
            out = forward(module, cp, rank, torch.float64 if precision == "fp64" else torch.float32)
        grads = _grads(module, out.sum())
        if cp > 1:  # each CP rank holds its own contribution; outputs go back to token order
            group = parallel_state.get_context_parallel_group()
            for g in grads.values():
                torch.distributed.all_reduce(g, group=group)
        runs[(cp, precision)] = (out.detach().double(), grads, rank)
        parallel_state.destroy_model_parallel()
    return runs


def _judge(runs, local):
    """``local(t, rank)``: this CP=2 rank's tokens of a whole-sequence tensor."""
    truth_out, truth, _ = runs[(1, "fp64")]
    one_out, one, _ = runs[(1, "bf16")]
    cp_out, cp, rank = runs[(2, "bf16")]
    out_err = rel_rms(cp_out, local(one_out, rank))
    ratios = {n: (rel_rms(cp[n], truth[n]), rel_rms(one[n], truth[n])) for n in truth}
    rel = {n: c / max(o, TOL / 3) for n, (c, o) in ratios.items()}  # errors below 1e-3 are all fine: floor them
    mean_ratio = sum(rel.values()) / len(rel)
    worst = max(ratios, key=lambda n: ratios[n][0] / max(TOL, 3 * ratios[n][1]))
    print(f"\noutput vs one GPU {out_err:.2e}; gradient error from float64, CP / one GPU: mean ratio "
          f"{mean_ratio:.2f} over {len(rel)} parameters; worst {worst}: CP {ratios[worst][0]:.2e} vs one GPU "
          f"{ratios[worst][1]:.2e}")
    for n, (c, o) in sorted(ratios.items(), key=lambda item: -rel[item[0]])[:8]:
        print(f"  {n}: CP {c:.2e}  one GPU {o:.2e}  ratio {rel[n]:.2f}")
    bad = {n: r for n, r in ratios.items() if not r[0] < max(TOL, 3 * r[1])}
    assert out_err < TOL, out_err
    assert not bad, bad
    assert mean_ratio <= 1.3, mean_ratio


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_megatron_block_cp2_bf16_matches_one_gpu(world, cuda, variant):
    if world != 2:
        pytest.skip("needs 2 processes")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(S, B, D, generator=gen).to(cuda)
    w = torch.randn(S, B, D, generator=gen).to(cuda)

    def forward(block, cp, rank, dtype):
        out = block(shard(x, cp, rank, "zigzag", dim=0).to(dtype), attention_mask=None)
        return out.to(dtype) * shard(w, cp, rank, "zigzag", dim=0).to(dtype)

    _judge(_run_three(lambda c: TransformerBlock(c, spec=pdelta_block_spec(2, variant), post_process=False),
                      forward, cuda), lambda t, rank: shard(t, 2, rank, "zigzag", dim=0))


def test_megatron_thd_packed_cp2_bf16_matches_one_gpu(world, cuda):
    """Megatron's packed THD batch: three sequences, each zigzag-split over the CP ranks on its own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if world != 2:
        pytest.skip("needs 2 processes")
    cu = [0, 512, 2560, S]  # sequence lengths multiples of 2 * cp, as Megatron pads them
    cu_t = torch.tensor(cu, dtype=torch.int32, device=cuda)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, cu_seqlens_q_padded=cu_t,
                             cu_seqlens_kv_padded=cu_t, max_seqlen_q=2048, max_seqlen_kv=2048)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(S, 1, D, generator=gen).to(cuda)
    w = torch.randn(S, 1, D, generator=gen).to(cuda)

    def piece(t, cp, rank):
        return shard(t, cp, rank, "zigzag_per_sequence", dim=0, cu_seqlens=cu)

    def forward(block, cp, rank, dtype):
        out = block(piece(x, cp, rank).to(dtype), attention_mask=None, packed_seq_params=packed)
        return out.to(dtype) * piece(w, cp, rank).to(dtype)

    _judge(_run_three(lambda c: TransformerBlock(c, spec=pdelta_block_spec(2, "pgdn"), post_process=False),
                      forward, cuda), lambda t, rank: piece(t, 2, rank))


def test_megatron_gpt_cp2_bf16_matches_one_gpu(world, cuda):
    if world != 2:
        pytest.skip("needs 2 processes")
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 256, (B, S), generator=gen).to(cuda)
    labels = torch.randint(0, 256, (B, S), generator=gen).to(cuda)

    def forward(model, cp, rank, dtype):
        return model(shard(tokens, cp, rank, "zigzag"), None, None, labels=shard(labels, cp, rank, "zigzag")).to(dtype)

    _judge(_run_three(lambda c: build_gpt_model(c, vocab_size=256, max_sequence_length=S, variant="pgdn"),
                      forward, cuda), lambda t, rank: shard(t, 2, rank, "zigzag", dim=1))
