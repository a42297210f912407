"""q/k L2 normalisation in Triton: one pass forward, one pass backward (PyTorch needs ~6 elementwise kernels each).

    y = s · x · r,  r = 1 / sqrt(|x|² + 1e-6)  (over the last dim)
    dx = r · (s · dy − y · (y·dy) / s)

Saves y and r, as the PyTorch form (``pdelta_cp.chunk.pipeline._L2Normalize``) does. With a chunk size, the same
pass also moves the stream layout [L, H, K] (any float dtype) to the chunk layout [L/C, H, C, K] in float32, and the
backward writes dx back in the stream layout and x's dtype: no separate relayout copies and casts either way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2

ROWS = 16  # rows per program


@triton.jit
def _stream_rows(rows, H, TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    """Row of the stream tensor [L, H, K] for each row of the output: itself, or (TO_CHUNKS) for chunk-layout row
    (n, h, c) of [Nc, H, C, K] the token n·C + c of head h."""
    if TO_CHUNKS:
        c = rows % C
        nh = rows // C
        return ((nh // H) * C + c) * H + nh % H
    return rows


@triton.jit
def _l2_fwd_kernel(X, Y, R, N, H, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                   TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(X + _stream_rows(rows, H, TO_CHUNKS, C)[:, None] * K + cols[None, :], mask=m, other=0.0)
    x = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)
    tl.store(Y + offs, x * (r * scale)[:, None], mask=m)
    tl.store(R + rows, r, mask=mr)


@triton.jit
def _l2_bwd_kernel(Y, R, DY, DX, N, H, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                   TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    y = tl.load(Y + offs, mask=m, other=0.0)
    dy = tl.load(DY + offs, mask=m, other=0.0)
    r = tl.load(R + rows, mask=mr, other=0.0)
    yd = tl.sum(y * dy, axis=1) / scale
    dx = r[:, None] * (scale * dy - y * yd[:, None])
    tl.store(DX + _stream_rows(rows, H, TO_CHUNKS, C)[:, None] * K + cols[None, :], dx, mask=m)  # cast to DX's dtype


class L2Normalize(torch.autograd.Function):
    """x [..., K] float32 contiguous -> scale · x / sqrt(|x|² + 1e-6); or, with ``chunk_size`` C, x [L, H, K] of any
    float dtype (L a multiple of C) -> y [L/C, H, C, K] float32 in the chunk layout (dx comes back as x is)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, chunk_size: int | None = None) -> torch.Tensor:
        K = x.shape[-1]
        N = x.numel() // max(K, 1)
        if chunk_size is None:
            y, H, C = torch.empty_like(x), 1, 1
        else:
            L, H, _ = x.shape
            C = chunk_size
            y = x.new_empty((L // C, H, C, K), dtype=torch.float32)
        r = y.new_empty(y.shape[:-1] + (1,))
        if N:
            _l2_fwd_kernel[(triton.cdiv(N, ROWS),)](x, y, r, N, H, float(scale), K=K, BK=next_pow2(K), BR=ROWS,
                                                    TO_CHUNKS=chunk_size is not None, C=C, num_warps=4)
        ctx.save_for_backward(y, r)
        ctx.scale, ctx.chunk_size, ctx.x_shape, ctx.x_dtype = float(scale), chunk_size, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, r = ctx.saved_tensors
        K = y.shape[-1]
        N = y.numel() // max(K, 1)
        dy = dy.contiguous()
        dx = y.new_empty(ctx.x_shape, dtype=ctx.x_dtype)
        C = ctx.chunk_size or 1
        H = y.shape[1] if ctx.chunk_size else 1
        if N:
            _l2_bwd_kernel[(triton.cdiv(N, ROWS),)](y, r, dy, dx, N, H, ctx.scale, K=K, BK=next_pow2(K), BR=ROWS,
                                                    TO_CHUNKS=ctx.chunk_size is not None, C=C, num_warps=4)
        return dx, None, None


def l2_normalize_triton(x: torch.Tensor, scale: float) -> torch.Tensor:
    return L2Normalize.apply(x.contiguous(), scale)


def l2_normalize_to_chunks_triton(x: torch.Tensor, scale: float, chunk_size: int) -> torch.Tensor:
    """x [L, H, K] in the stream layout (L a multiple of ``chunk_size``) -> normalised [L/C, H, C, K] float32."""
    if x.dim() != 3 or x.shape[0] % chunk_size:
        raise ValueError(f"x must be [L, H, K] with L a multiple of chunk_size={chunk_size}, got {tuple(x.shape)}")
    return L2Normalize.apply(x.contiguous(), scale, chunk_size)
