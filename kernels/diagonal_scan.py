"""The preconditioner's inter-chunk pass in Triton: A ← decay_c ⊙ A + end_c over each segment's chunks.

The PyTorch form (:func:`pdelta_cp.chunk.plan.diagonal_scan`) is a log-depth Hillis–Steele scan: ~13 small ops
per doubling step forward and ~23 backward — about 300 launches per layer at 32K tokens, for almost no
arithmetic. Here one program per (feature block, segment) walks the segment in tiles of ``BC`` chunks; inside a
tile an associative scan composes the affine steps (d, a) ∘ (d', a') = (d d', d' a + a'), and the state carried
between tiles joins them. Backward runs the adjoint recurrence the same way with the tile rows read in reverse:

    μ_c = d_{c+1} μ_{c+1} + g_{c+1}  (μ_last = gradient on the final state),  dend_c = μ_c,  ddecay_c = μ_c ⊙ A_c,
    dinit = g_first + d_first μ_first              (g_c: gradient on the state entering chunk c)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..indices import index_tensor
from ._triton_utils import next_pow2

BC = 32  # chunks per tile


@triton.jit
def _compose(d1, a1, d2, a2):
    """(d1, a1) then (d2, a2): x ↦ d2 (d1 x + a1) + a2."""
    return d1 * d2, d2 * a1 + a2


@triton.jit
def _program(FIRST, LENGTH, F, BC: tl.constexpr, BF: tl.constexpr):
    """This program's segment (index, first chunk, chunk count), feature columns and mask, and tile rows."""
    i_f, i_s = tl.program_id(0), tl.program_id(1)
    cols = i_f * BF + tl.arange(0, BF)
    return i_s, tl.load(FIRST + i_s).to(tl.int64), tl.load(LENGTH + i_s), cols, cols < F, tl.arange(0, BC)


@triton.jit
def _diag_fwd_kernel(INIT, DECAY, END, FIRST, LENGTH, BEFORE, FINAL, F, BC: tl.constexpr, BF: tl.constexpr):
    i_s, first, n, cols, mf, rows = _program(FIRST, LENGTH, F, BC, BF)
    carry = tl.load(INIT + i_s * F + cols, mask=mf, other=0.0)
    if n > 0:
        tl.store(BEFORE + first * F + cols, carry, mask=mf)
    for t in range(0, n, BC):
        i = t + rows
        ok = (i < n)[:, None] & mf[None, :]
        off = (first + i)[:, None] * F + cols[None, :]
        d = tl.load(DECAY + off, mask=ok, other=1.0)  # rows past the segment: the identity step
        a = tl.load(END + off, mask=ok, other=0.0)
        D, A = tl.associative_scan((d, a), 0, _compose)
        after = D * carry[None, :] + A  # state leaving every chunk of the tile
        tl.store(BEFORE + off + F, after, mask=((i + 1) < n)[:, None] & mf[None, :])  # enters the next chunk
        carry = tl.sum(tl.where((rows == BC - 1)[:, None], after, 0.0), axis=0)  # identity rows keep the last
    tl.store(FINAL + i_s * F + cols, carry, mask=mf)


@triton.jit
def _diag_bwd_kernel(DECAY, BEFORE, G_BEFORE, G_FINAL, FIRST, LENGTH, D_DECAY, D_END, D_INIT, F,
                     BC: tl.constexpr, BF: tl.constexpr):
    i_s, first, n, cols, mf, rows = _program(FIRST, LENGTH, F, BC, BF)
    carry = tl.load(G_FINAL + i_s * F + cols, mask=mf, other=0.0)  # μ of the last chunk
    for t in range(0, n, BC):
        r = n - 1 - (t + rows)  # chunk positions, descending
        ok = (r >= 0)[:, None] & mf[None, :]
        nxt = ((r >= 0) & (r + 1 < n))[:, None] & mf[None, :]
        off = (first + r)[:, None] * F + cols[None, :]
        b = tl.load(DECAY + off + F, mask=nxt, other=1.0)
        a = tl.load(G_BEFORE + off + F, mask=nxt, other=0.0)
        B, A = tl.associative_scan((b, a), 0, _compose)
        mu = B * carry[None, :] + A
        tl.store(D_END + off, mu, mask=ok)
        tl.store(D_DECAY + off, mu * tl.load(BEFORE + off, mask=ok, other=0.0), mask=ok)
        carry = tl.sum(tl.where((rows == BC - 1)[:, None], mu, 0.0), axis=0)
    if n > 0:
        d0 = tl.load(DECAY + first * F + cols, mask=mf, other=0.0)
        g0 = tl.load(G_BEFORE + first * F + cols, mask=mf, other=0.0)
        tl.store(D_INIT + i_s * F + cols, g0 + d0 * carry, mask=mf)
    else:
        tl.store(D_INIT + i_s * F + cols, carry, mask=mf)


def _launch_config(F: int) -> tuple[int, int]:
    BF = min(256, next_pow2(F))
    return BF, triton.cdiv(F, BF)


class DiagonalScan(torch.autograd.Function):
    """init [Nseg, *S], decay and end [Nc, *S] (float32) -> (state entering every chunk [Nc, *S], final state of
    every segment [Nseg, *S]); saves decay and the entering states."""

    @staticmethod
    def forward(ctx, init: Tensor, decay: Tensor, end: Tensor, seg_first: tuple, seg_len: tuple):
        shape = end.shape
        F = math.prod(shape[1:])  # features per chunk
        init, decay, end = (t.reshape(t.shape[0], F).contiguous() for t in (init, decay.expand(shape), end))
        before, final = torch.empty_like(end), torch.empty_like(init)
        first, length = index_tensor(seg_first, end.device), index_tensor(seg_len, end.device)
        BF, NF = _launch_config(F)
        if init.shape[0]:
            _diag_fwd_kernel[(NF, init.shape[0])](init, decay, end, first, length, before, final, F, BC=BC, BF=BF)
        ctx.save_for_backward(decay, before, first, length)
        ctx.shapes = (shape, init.shape[0], F)
        return before.view(shape), final.view((init.shape[0],) + tuple(shape[1:]))

    @staticmethod
    def backward(ctx, g_before: Tensor | None, g_final: Tensor | None):
        decay, before, first, length = ctx.saved_tensors
        shape, nseg, F = ctx.shapes
        g_before = torch.zeros_like(before) if g_before is None else g_before.reshape(before.shape).contiguous()
        g_final = decay.new_zeros((nseg, F)) if g_final is None else g_final.reshape(nseg, F).contiguous()
        d_decay, d_end, d_init = torch.empty_like(decay), torch.empty_like(decay), decay.new_empty((nseg, F))
        BF, NF = _launch_config(F)
        if nseg:
            _diag_bwd_kernel[(NF, nseg)](decay, before, g_before, g_final, first, length, d_decay, d_end, d_init,
                                         F, BC=BC, BF=BF)
        return d_init.view((nseg,) + tuple(shape[1:])), d_decay.view(shape), d_end.view(shape), None, None


def diagonal_scan_triton(plan, init: Tensor, decay: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """Drop-in for :func:`pdelta_cp.chunk.plan.diagonal_scan` (float32 tensors)."""
    return DiagonalScan.apply(init, decay, end, tuple(plan.seg_first_chunk), tuple(plan.seg_num_chunks))
