"""The preconditioner's per-chunk zero-start end state in Triton (the diagonal summary that CP exchanges):

    a[n, h, :] = Σ_c w[n, h, c] · k̂[n, h, c, :]²        (w = e^{σ − G_c} β_atk,c; σ, the total log-decay, is G_C)

Backward: dw_c = Σ_k da_k k̂_ck²,  dk̂_ck = 2 w_c k̂_ck da_k. One read of k̂ forward, one read and one write back
(the PyTorch form materialises k̂² twice and a broadcast product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import remade
from ._triton_utils import next_pow2
from .stages import arm, take_one


@triton.jit
def _ends_fwd_kernel(W, KH, A, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    w = tl.load(W + i * C + rc)
    k = tl.load(KH + (i * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    tl.store(A + i * K + rk, tl.sum(w[:, None] * k * k, axis=0), mask=mk)


@triton.jit
def _ends_bwd_kernel(W, KH, DA, DW, DK, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     ACCUMULATE: tl.constexpr):
    """ACCUMULATE: DK holds K̂'s other gradients (GradHandoff "weighted_squares"); add to them in place."""
    i = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    w = tl.load(W + i * C + rc)
    k = tl.load(KH + (i * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    da = tl.load(DA + i * K + rk, mask=mk, other=0.0)
    tl.store(DW + i * C + rc, tl.sum(k * k * da[None, :], axis=1))
    dk = 2.0 * k * w[:, None] * da[None, :]
    dk_ptrs = DK + (i * C + rc[:, None]) * K + rk[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=mk[None, :], other=0.0)
    tl.store(dk_ptrs, dk, mask=mk[None, :])


class WeightedSquares(torch.autograd.Function):
    """w [Nc, H, C], k̂ [Nc, H, C, K] (float32) -> Σ_c w_c k̂_c² [Nc, H, K]; saves w and k̂ only. With a
    ``handoff`` (kernels.stages.GradHandoff) its backward adds K̂'s other gradients, left in "weighted_squares"."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, k: torch.Tensor, handoff=None) -> torch.Tensor:
        w, k = w.contiguous(), k.contiguous()
        Nc, H, C, K = k.shape
        a = k.new_empty(Nc, H, K)
        if Nc * H:
            _ends_fwd_kernel[(Nc * H,)](w, k, a, K=K, C=C, BK=next_pow2(K), num_warps=4 if K <= 64 else 8)
        remade.save(ctx, w, k, share=True)
        ctx.handoff = handoff
        arm(handoff, "weighted_squares")
        return a

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        w, k = remade.load(ctx)[1]
        Nc, H, C, K = k.shape
        left = take_one(ctx.handoff, "weighted_squares")
        dw, dk = torch.empty_like(w), torch.empty_like(k) if left is None else left
        if Nc * H:
            _ends_bwd_kernel[(Nc * H,)](w, k, da.contiguous(), dw, dk, K=K, C=C, BK=next_pow2(K),
                                        ACCUMULATE=left is not None, num_warps=4 if K <= 64 else 8)
        return dw, dk, None


def weighted_squares_triton(w: torch.Tensor, k: torch.Tensor, handoff=None) -> torch.Tensor:
    return WeightedSquares.apply(w, k, handoff)
