"""q/k L2 normalisation in Triton: one pass forward, one pass backward (PyTorch needs ~6 elementwise kernels each).

    y = s · x · r,  r = 1 / sqrt(|x|² + 1e-6)  (over the last dim)
    dx = r · (s · dy − y · (y·dy) / s)

Saves x and r (not y, unlike the PyTorch form ``pdelta_cp.chunk.pipeline._L2Normalize``): the backward makes y
again from them in-register, so the float32 y lives only as long as the stages that read it keep it — not through
the whole backward (x is the caller's tensor, alive anyway; y is twice its size for 16-bit x). With a chunk size,
the same pass also moves the stream layout [L, H, K] (any float dtype) to the chunk layout [Nc, H, C, K] in float32
(chunk n holds tokens starts[n] .. starts[n] + lens[n] − 1, zero rows after them), and the backward writes dx back
in the stream layout and x's dtype: no separate relayout copies and casts either way.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import remade
from ._triton_utils import next_pow2

ROWS = 16  # rows per program


@triton.jit
def _stream_rows(rows, mr, H, STARTS, LENS, TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    """(Row of the stream tensor [L, H, K] for each row of the output, whether it holds a token): TO_CHUNKS = 0,
    itself; else for chunk-layout row (n, h, c) of [Nc, H, C, K] the token of head h at n·C + c (TO_CHUNKS = 1,
    whole chunks), or at STARTS[n] + c if c < LENS[n] (TO_CHUNKS = 2)."""
    if TO_CHUNKS == 1:
        c = rows % C
        nh = rows // C
        return ((nh // H) * C + c) * H + nh % H, mr
    if TO_CHUNKS == 2:
        c = rows % C
        nh = rows // C
        n = nh // H
        start = tl.load(STARTS + n, mask=mr, other=0).to(tl.int64)
        valid = mr & (c < tl.load(LENS + n, mask=mr, other=0))
        return (start + c) * H + nh % H, valid
    return rows, mr


@triton.jit
def _l2_fwd_kernel(X, Y, R, N, H, STARTS, LENS, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                   TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    src, valid = _stream_rows(rows, mr, H, STARTS, LENS, TO_CHUNKS, C)
    x = tl.load(X + src[:, None] * K + cols[None, :], mask=valid[:, None] & (cols[None, :] < K), other=0.0)
    x = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)
    tl.store(Y + offs, x * (r * scale)[:, None], mask=m)
    tl.store(R + rows, r, mask=mr)


@triton.jit
def _l2_bwd_kernel(X, R, DY, DX, N, H, STARTS, LENS, scale, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                   TO_CHUNKS: tl.constexpr, C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    mr = rows < N
    m = mr[:, None] & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    src, valid = _stream_rows(rows, mr, H, STARTS, LENS, TO_CHUNKS, C)
    xm = valid[:, None] & (cols[None, :] < K)
    x = tl.load(X + src[:, None] * K + cols[None, :], mask=xm, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0)
    r = tl.load(R + rows, mask=mr, other=0.0)
    y = x * (r * scale)[:, None]  # the forward's y, made again (as the forward computes it)
    yd = tl.sum(y * dy, axis=1) / scale
    dx = r[:, None] * (scale * dy - y * yd[:, None])
    tl.store(DX + src[:, None] * K + cols[None, :], dx, mask=xm)  # in DX's dtype


def _normalize(x: torch.Tensor, scale: float, chunk_size: int | None = None, starts: torch.Tensor | None = None,
               lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r) of the forward kernel; see :class:`L2Normalize`."""
    K = x.shape[-1]
    if chunk_size is None:
        y, H, C = torch.empty_like(x), 1, 1
    else:
        H, C = x.shape[1], chunk_size
        Nc = x.shape[0] // C if starts is None else starts.numel()
        y = x.new_empty((Nc, H, C, K), dtype=torch.float32)
    N = y.numel() // max(K, 1)
    r = y.new_empty(y.shape[:-1] + (1,))
    table = (x, x) if starts is None or chunk_size is None else (starts, lens)  # (unread placeholders)
    mode = 0 if chunk_size is None else 1 if starts is None else 2
    if N:
        _l2_fwd_kernel[(triton.cdiv(N, ROWS),)](x, y, r, N, H, *table, float(scale), K=K, BK=next_pow2(K),
                                                BR=ROWS, TO_CHUNKS=mode, C=C, num_warps=4)
    return y, r


def _normalized(x: torch.Tensor, *table: torch.Tensor, scale: float, chunk_size: int) -> torch.Tensor:
    """y again, for :mod:`remade` (bitwise the forward's: the same kernel on the same x)."""
    return _normalize(x, scale, chunk_size, *table)[0]


class L2Normalize(torch.autograd.Function):
    """x [..., K] float32 contiguous -> scale · x / sqrt(|x|² + 1e-6); or, with ``chunk_size`` C and the chunks'
    ``starts`` and ``lens`` [Nc], x [L, H, K] of any float dtype -> y [Nc, H, C, K] float32 in the chunk layout
    (dx comes back as x is)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, chunk_size: int | None = None, starts: torch.Tensor | None = None,
                lens: torch.Tensor | None = None) -> torch.Tensor:
        y, r = _normalize(x, scale, chunk_size, starts, lens)
        mode = 0 if chunk_size is None else 1 if starts is None else 2
        ctx.save_for_backward(x, r, *(() if starts is None else (starts, lens)))  # nothing on ctx (block recompute)
        ctx.scale, ctx.chunk_size, ctx.mode = float(scale), chunk_size, mode
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, *table = ctx.saved_tensors
        K = x.shape[-1]
        N = r.numel()  # rows of y: [Nc, H, C] in the chunk layout, else x's
        dy = dy.contiguous()
        dx = torch.empty_like(x)  # every token is one chunk row: all of it is written
        C = ctx.chunk_size or 1
        H = x.shape[1] if ctx.chunk_size else 1
        table = table or (x, x)
        if N:
            _l2_bwd_kernel[(triton.cdiv(N, ROWS),)](x, r, dy, dx, N, H, *table, ctx.scale, K=K, BK=next_pow2(K),
                                                    BR=ROWS, TO_CHUNKS=ctx.mode, C=C, num_warps=4)
        return dx, None, None, None, None


def l2_normalize_triton(x: torch.Tensor, scale: float) -> torch.Tensor:
    return L2Normalize.apply(x.contiguous(), scale)


def l2_normalize_to_chunks_triton(x: torch.Tensor, scale: float, chunk_size: int, starts: torch.Tensor | None = None,
                                  lens: torch.Tensor | None = None) -> torch.Tensor:
    """x [L, H, K] in the stream layout -> normalised [Nc, H, C, K] float32: chunk n holds tokens starts[n] ..
    starts[n] + lens[n] − 1 (a chunk plan's ``chunk_start``, ``chunk_len``; zero rows after them). Without them, L
    must be a multiple of ``chunk_size`` and chunk n holds tokens n·C .. n·C + C − 1."""
    if starts is None and (x.dim() != 3 or x.shape[0] % chunk_size):
        raise ValueError(f"x must be [L, H, K] with L a multiple of chunk_size={chunk_size} (or give the chunks' "
                         f"starts and lens), got {tuple(x.shape)}")
    x = x.contiguous()
    table = () if starts is None else (starts, lens)
    y = L2Normalize.apply(x, scale, chunk_size, *table)
    # the stages keep x and the row tables for y, not y (see kernels/remade.py)
    return remade.register(y, functools.partial(_normalized, scale=float(scale), chunk_size=chunk_size), x, *table)
