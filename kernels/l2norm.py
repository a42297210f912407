"""q/k L2 normalisation in Triton: one pass forward, one pass backward (PyTorch needs ~6 elementwise kernels each).

    y = s · x · r,  r = 1 / sqrt(|x|² + 1e-6)  (over the last dim)
    dx = r · (s · dy − y · (y·dy) / s)

Saves y and r, as the PyTorch form (``pdelta_cp.chunk.pipeline._L2Normalize``) does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2

ROWS = 16  # rows per program


@triton.jit
def _l2_fwd_kernel(X, Y, R, N, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(X + offs, mask=m, other=0.0)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)
    tl.store(Y + offs, x * (r * scale)[:, None], mask=m)
    tl.store(R + rows, r, mask=mr)


@triton.jit
def _l2_bwd_kernel(Y, R, DY, DX, N, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    y = tl.load(Y + offs, mask=m, other=0.0)
    dy = tl.load(DY + offs, mask=m, other=0.0)
    r = tl.load(R + rows, mask=mr, other=0.0)
    yd = tl.sum(y * dy, axis=1) / scale
    tl.store(DX + offs, r[:, None] * (scale * dy - y * yd[:, None]), mask=m)


class L2Normalize(torch.autograd.Function):
    """x [..., K] float32 contiguous -> scale · x / sqrt(|x|² + 1e-6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        K = x.shape[-1]
        N = x.numel() // max(K, 1)
        y, r = torch.empty_like(x), x.new_empty(x.shape[:-1] + (1,))
        if N:
            _l2_fwd_kernel[(triton.cdiv(N, ROWS),)](x, y, r, N, float(scale), K=K, BK=next_pow2(K), BR=ROWS,
                                                    num_warps=4)
        ctx.save_for_backward(y, r)
        ctx.scale = float(scale)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, r = ctx.saved_tensors
        K = y.shape[-1]
        N = y.numel() // max(K, 1)
        dy = dy.contiguous()
        dx = torch.empty_like(y)
        if N:
            _l2_bwd_kernel[(triton.cdiv(N, ROWS),)](y, r, dy, dx, N, ctx.scale, K=K, BK=next_pow2(K), BR=ROWS,
                                                    num_warps=4)
        return dx, None


def l2_normalize_triton(x: torch.Tensor, scale: float) -> torch.Tensor:
    return L2Normalize.apply(x.contiguous(), scale)
