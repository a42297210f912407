"""Megatron-core on 2 GPUs (NCCL, bf16 autocast, Triton kernels): a block of our mixers and the GPT builder under
TP=1 CP=2 give the TP=1 CP=1 outputs, losses and parameter gradients within 3e-3 relative RMS.

    torchrun --nproc-per-node 2 -m pytest -q -m gpu tests/distributed/test_megatron_gpu.py
Parameters stay fp32, activations and the op run in bf16 (autocast). Under autocast a weight gradient leaves its
GEMM in bf16, so splitting the token sum over two GPUs alone moves parameter gradients by ~4e-3 (measured on
H200, MLP weights included). Parameter gradients must therefore stay within max(3e-3, 2 x that floor), the floor
measured on one GPU by summing the bf16 gradients of the two ranks' token sets; outputs and losses within 3e-3.
"""
import os

import pytest
import torch

megatron = pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from test_megatron import _compare  # noqa: E402  (tests/distributed is on sys.path)

from pdelta_cp.cp.layout import shard  # noqa: E402
from pdelta_cp.megatron_patches.specs import build_gpt_model, pdelta_block_spec  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.gpu]
S, B, D, HEADS = 4096, 1, 512, 4  # head dim 128, as in the kernel benchmarks
TOL = 3e-3


@pytest.fixture(scope="module")
def cuda(world):
    if os.environ.get("PDELTA_GPU_TEST_ON_CPU") == "1":  # dry run of the test logic on CPU (torch backend)
        return torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip("needs one CUDA device per rank")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


def _config(cp, device):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=cp)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    else:
        from pdelta_cp.megatron_patches.cpu import enable_cpu

        enable_cpu()
    torch.manual_seed(0)
    return TransformerConfig(num_layers=2, hidden_size=D, num_attention_heads=HEADS, use_cpu_initialization=True,
                             params_dtype=torch.float32, context_parallel_size=cp, hidden_dropout=0.0,
                             attention_dropout=0.0, normalization="RMSNorm", bias_dropout_fusion=False,
                             add_bias_linear=False, gradient_accumulation_fusion=False)


def _grads(module, scalar, retain_graph=False):
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(scalar, [p for _, p in module.named_parameters()], retain_graph=retain_graph)
    return dict(zip(names, grads))


def _split_floor(module, forward, token_dim, full):
    """rel RMS between the full-sum gradients ``full`` and the sum of the gradients of the two zigzag halves'
    token sets, on one GPU (``forward()`` recomputes the per-token loss: Megatron's loss backward is in place)."""
    from pdelta_cp.testing import rel_rms

    parts = []
    for r in range(2):
        per_token = forward()
        idx = shard(torch.arange(per_token.shape[token_dim], device=per_token.device), 2, r, "zigzag", dim=0)
        parts.append(_grads(module, per_token.index_select(token_dim, idx).sum()))
    return {n: rel_rms(parts[0][n] + parts[1][n], full[n]) for n in full}


def _beyond_floor(errors, floor):
    worst = max(errors, key=lambda n: errors[n] / max(TOL, 2 * floor.get(n, 0.0)))
    print(f"\nout/loss {errors.get('out'):.2e}; worst gradient {worst} {errors[worst]:.2e} "
          f"(floor {floor.get(worst, 0.0):.2e}); largest floor {max(floor.values()):.2e}")
    return {n: (e, floor.get(n)) for n, e in errors.items() if not e < max(TOL, 2 * floor.get(n, 0.0))}


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_megatron_block_cp2_bf16_matches_one_gpu(world, cuda, variant):
    if world != 2:
        pytest.skip("needs 2 processes")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(S, B, D, generator=gen).to(cuda)
    w = torch.randn(S, B, D, generator=gen).to(cuda)
    outs = {}
    for cp in (1, 2):
        block = TransformerBlock(_config(cp, cuda), spec=pdelta_block_spec(2, variant), post_process=False).to(cuda)
        rank = parallel_state.get_context_parallel_rank()
        xl, wl = (shard(t, cp, rank, "zigzag", dim=0) for t in (x, w))
        def forward():
            with torch.autocast(cuda.type, dtype=torch.bfloat16, enabled=cuda.type == "cuda"):  # CPU: fp32
                return block(xl, attention_mask=None)

        out = forward()
        grads = _grads(block, (out.float() * wl).sum())
        floor = _split_floor(block, lambda: forward().float() * wl, 0, grads) if cp == 1 else None
        outs[cp] = (block, out.detach().float(), grads, floor)
    block, out, grads, _ = outs[2]
    ref_out = shard(outs[1][1], 2, parallel_state.get_context_parallel_rank(), "zigzag", dim=0)
    bad = _beyond_floor(_compare(block, out, grads, ref_out, outs[1][2], tol=0.0), outs[1][3])
    assert not bad, bad


def test_megatron_gpt_cp2_bf16_matches_one_gpu(world, cuda):
    if world != 2:
        pytest.skip("needs 2 processes")
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 256, (B, S), generator=gen).to(cuda)
    labels = torch.randint(0, 256, (B, S), generator=gen).to(cuda)
    runs = {}
    for cp in (1, 2):
        model = build_gpt_model(_config(cp, cuda), vocab_size=256, max_sequence_length=S, variant="pgdn").to(cuda)
        rank = parallel_state.get_context_parallel_rank()
        def forward():
            with torch.autocast(cuda.type, dtype=torch.bfloat16, enabled=cuda.type == "cuda"):  # CPU: fp32
                return model(shard(tokens, cp, rank, "zigzag"), None, None,
                             labels=shard(labels, cp, rank, "zigzag")).float()

        loss = forward()
        grads = _grads(model, loss.sum())
        floor = _split_floor(model, forward, 1, grads) if cp == 1 else None
        runs[cp] = (model, loss.detach(), grads, floor)
    model, loss, grads, _ = runs[2]
    ref_loss = shard(runs[1][1], 2, parallel_state.get_context_parallel_rank(), "zigzag")
    bad = _beyond_floor(_compare(model, loss, grads, ref_loss, runs[1][2], tol=0.0), runs[1][3])
    assert not bad, bad
