"""The preconditioner's per-chunk zero-start end state in Triton (the diagonal summary that CP exchanges):

    a[n, h, :] = Σ_c w[n, h, c] · k̂[n, h, c, :]²        (w = e^{σ − G_c} β_atk,c; σ, the total log-decay, is G_C)

Backward: dw_c = Σ_k da_k k̂_ck²,  dk̂_ck = 2 w_c k̂_ck da_k. One read of k̂ forward, one read and one write back
(the PyTorch form materialises k̂² twice and a broadcast product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2


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
def _ends_bwd_kernel(W, KH, DA, DW, DK, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    w = tl.load(W + i * C + rc)
    k = tl.load(KH + (i * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    da = tl.load(DA + i * K + rk, mask=mk, other=0.0)
    tl.store(DW + i * C + rc, tl.sum(k * k * da[None, :], axis=1))
    tl.store(DK + (i * C + rc[:, None]) * K + rk[None, :], 2.0 * k * w[:, None] * da[None, :], mask=mk[None, :])


class WeightedSquares(torch.autograd.Function):
    """w [Nc, H, C], k̂ [Nc, H, C, K] (float32) -> Σ_c w_c k̂_c² [Nc, H, K]; saves w and k̂ only."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        w, k = w.contiguous(), k.contiguous()
        Nc, H, C, K = k.shape
        a = k.new_empty(Nc, H, K)
        if Nc * H:
            _ends_fwd_kernel[(Nc * H,)](w, k, a, K=K, C=C, BK=next_pow2(K), num_warps=4 if K <= 64 else 8)
        ctx.save_for_backward(w, k)
        return a

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        w, k = ctx.saved_tensors
        Nc, H, C, K = k.shape
        dw, dk = torch.empty_like(w), torch.empty_like(k)
        if Nc * H:
            _ends_bwd_kernel[(Nc * H,)](w, k, da.contiguous(), dw, dk, K=K, C=C, BK=next_pow2(K),
                                        num_warps=4 if K <= 64 else 8)
        return dw, dk


weighted_squares_triton = WeightedSquares.apply
