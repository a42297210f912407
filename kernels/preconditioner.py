"""Write keys from the preconditioner state, in Triton: A at every token, the squash, p = k̂ ⊙ m — and back.

Per chunk, key head and tile of channels (everything but one [C, C] x [C, BK] product is element-wise):

    G = cumsum(g_atk),  U = β_atk k̂²,  A_i = e^{G_i} A_start + Σ_{j<=i} e^{G_i − G_j} U_j
    r = log(A + eps) − c,  s = r / (1 + |r|),  m = x^(−s),  p = k̂ m

Backward from dp:  dm = dp k̂;  dr = −ln(x) m dm / (1 + |r|)²;  dA = dr / (A + eps);  dc = −Σ dr
    dA_start = Σ_i e^{G_i} dA_i;  dU = Dᵀ dA (D_ij = e^{G_i − G_j}, i >= j);  dk̂ = dp m + 2 β_atk k̂ dU
    dβ_atk = Σ_k k̂² dU;  dG_i = Σ_k e^{G_i} A_start dA_i + rowsum(E) − colsum(E), E = (dA Uᵀ) ⊙ D;
    dg_atk = reverse cumsum of dG within the chunk.
Partial sums over channel tiles (dβ_atk, dG, dc) go to separate slots and are summed afterwards: no atomics.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..chunk.preconditioner import write_keys
from . import remade
from ._triton_utils import dot_precision, launch_or_fallback, next_pow2
from .stages import arm, pass_on, plus_left, take_one

C = 64


@triton.jit
def _keys_tile(KH, GA, BA, AS, CEN, hrow, i_h, rc, rk, mk, K: tl.constexpr, C: tl.constexpr,
               LOG_X, EPS, PRECISION: tl.constexpr):
    """(k̂, G, β_atk, U, D, A_start, A, r, m) of one chunk, key head and channel tile."""
    kk = tl.load(KH + (hrow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    G = tl.cumsum(tl.load(GA + hrow + rc), axis=0)
    beta = tl.load(BA + hrow + rc)
    U = beta[:, None] * kk * kk
    lower = rc[:, None] >= rc[None, :]
    D = tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0))
    D = tl.where(lower, D, 0.0)
    a0 = tl.load(AS + (hrow // C) * K + rk, mask=mk, other=0.0)
    A = tl.exp(G)[:, None] * a0[None, :] + tl.dot(D, U, input_precision=PRECISION)
    r = tl.log(A + EPS) - tl.load(CEN + i_h)
    m = tl.exp(-LOG_X * (r / (1.0 + tl.abs(r))))
    return kk, G, beta, U, D, a0, A, r, m


@triton.jit
def _keys_fwd_kernel(KH, GA, BA, AS, CEN, P, H, LOG_X, EPS, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     PRECISION: tl.constexpr):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hrow = (i_c.to(tl.int64) * H + i_h) * C
    rc = tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    kk, G, beta, U, D, a0, A, r, m = _keys_tile(KH, GA, BA, AS, CEN, hrow, i_h, rc, rk, mk, K, C, LOG_X, EPS,
                                                PRECISION)
    tl.store(P + (hrow + rc[:, None]) * K + rk[None, :], kk * m, mask=mk[None, :])


@triton.jit
def _keys_bwd_kernel(KH, GA, BA, AS, CEN, DP, DK, DG, DB, DAS, DC, H, NCH, LOG_X, EPS, K: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr):
    """DK [Nc,H,C,K] and DAS [Nc,H,K] are per tile; DG, DB [NKB,Nc,H,C] and DC [NKB,Nc,H] are slot partials.
    ACCUMULATE: DK holds the WY stage's dK̂ (GradHandoff "write_keys"); add to it in place."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hrow = (i_c.to(tl.int64) * H + i_h) * C
    rc = tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    kk, G, beta, U, D, a0, A, r, m = _keys_tile(KH, GA, BA, AS, CEN, hrow, i_h, rc, rk, mk, K, C, LOG_X, EPS,
                                                PRECISION)
    dp = tl.load(DP + (hrow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    denom = 1.0 + tl.abs(r)
    dr = -LOG_X * m * dp * kk / (denom * denom)
    dr = tl.where(mk[None, :], dr, 0.0)
    dA = dr / (A + EPS)
    eG = tl.exp(G)
    tl.store(DAS + (hrow // C) * K + rk, tl.sum(eG[:, None] * dA, axis=0), mask=mk)
    # dU = Dᵀ dA, computed as (transposed D) @ dA without transposing a dot result
    upper = rc[:, None] <= rc[None, :]
    D_t = tl.where(upper, tl.exp(tl.where(upper, G[None, :] - G[:, None], 0.0)), 0.0)
    dU = tl.dot(D_t, dA, input_precision=PRECISION)
    dk = dp * m + 2.0 * beta[:, None] * kk * dU
    dk_ptrs = DK + (hrow + rc[:, None]) * K + rk[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=mk[None, :], other=0.0)
    tl.store(dk_ptrs, dk, mask=mk[None, :])
    slot = i_k.to(tl.int64) * NCH
    tl.store(DB + slot * C + hrow + rc, tl.sum(kk * kk * dU, axis=1))
    k_t = tl.load(KH + (hrow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0)  # [BK, C]
    E = tl.dot(dA, beta[None, :] * k_t * k_t, input_precision=PRECISION) * D  # (dA Uᵀ) ⊙ D
    dG = tl.sum(eG[:, None] * a0[None, :] * dA, axis=1) + tl.sum(E, axis=1) - tl.sum(E, axis=0)
    tl.store(DG + slot * C + hrow + rc, dG)
    tl.store(DC + slot + hrow // C, -tl.sum(tl.sum(dr, axis=1), axis=0))


def _config(K: int):
    BK = min(64, max(16, next_pow2(K)))
    return BK, triton.cdiv(K, BK)


def _write_keys(k_hat, g_atk, beta_atk, A_start, centre, *, x: float, eps: float) -> tuple[torch.Tensor, bool]:
    """(p, whether the PyTorch form made it) — the kernel where it fits the GPU."""
    Nc, H, _, K = k_hat.shape
    BK, NKB = _config(K)
    p = torch.empty_like(k_hat)
    fallback = Nc > 0 and not launch_or_fallback("write_keys_fwd", lambda: _keys_fwd_kernel[(NKB, Nc, H)](
        k_hat, g_atk, beta_atk, A_start, centre, p, H, math.log(x), eps, K=K, C=C, BK=BK, PRECISION=dot_precision(),
        num_warps=4))
    if fallback:
        p = write_keys(k_hat, g_atk, beta_atk, A_start, centre, x, eps)
    return p, fallback


def _write_keys_again(*inputs: torch.Tensor, x: float, eps: float) -> torch.Tensor:
    """p again, for :mod:`remade` (bitwise the forward's)."""
    return _write_keys(*inputs, x=x, eps=eps)[0]


class WriteKeys(torch.autograd.Function):
    """With a ``handoff`` (kernels.stages.GradHandoff) the backward adds the WY stage's dK̂ (slot "write_keys") and
    passes the sum on to the preconditioner's chunk ends (slot "weighted_squares") when that slot is armed."""

    @staticmethod
    def forward(ctx, k_hat, g_atk, beta_atk, A_start, centre, x, eps, handoff):
        p, ctx.fallback = _write_keys(k_hat, g_atk, beta_atk, A_start, centre, x=x, eps=eps)
        remade.save(ctx, k_hat, g_atk, beta_atk, A_start, centre, share=True)
        ctx.x, ctx.eps, ctx.handoff = x, eps, handoff
        arm(handoff, "write_keys")
        return p

    @staticmethod
    def backward(ctx, dp):
        k_hat, g_atk, beta_atk, A_start, centre = remade.load(ctx)[1]
        Nc, H, _, K = k_hat.shape
        BK, NKB = _config(K)
        dp = dp.contiguous()
        left = take_one(ctx.handoff, "write_keys")
        dk, dAs = torch.empty_like(k_hat) if left is None else left, torch.empty_like(A_start)
        dG, db = k_hat.new_empty(NKB, Nc, H, C), k_hat.new_empty(NKB, Nc, H, C)
        dc = k_hat.new_empty(NKB, Nc, H)
        if Nc and not ctx.fallback and launch_or_fallback("write_keys_bwd", lambda: _keys_bwd_kernel[(NKB, Nc, H)](
                k_hat, g_atk, beta_atk, A_start, centre, dp, dk, dG, db, dAs, dc, H, Nc * H, math.log(ctx.x),
                ctx.eps, K=K, C=C, BK=BK, PRECISION=dot_precision(), ACCUMULATE=left is not None, num_warps=4)):
            dG = dG.sum(0)
            dg = dG.flip(-1).cumsum(-1).flip(-1)  # G = cumsum(g): dg_t = Σ_{i >= t} dG_i
            return pass_on(ctx.handoff, "weighted_squares", dk), dg, db.sum(0), dAs, dc.sum((0, 1)), None, None, None
        inputs = [t.detach().requires_grad_(True) for t in (k_hat, g_atk, beta_atk, A_start, centre)]
        with torch.enable_grad():
            dk, *rest = torch.autograd.grad(write_keys(*inputs, ctx.x, ctx.eps), inputs, dp)
        if left is not None:  # dk was not written by the kernel: left still holds the WY stage's dK̂ alone
            dk = plus_left(dk, left)
        return pass_on(ctx.handoff, "weighted_squares", dk), *rest, None, None, None


def write_keys_triton(k_hat, g_atk, beta_atk, A_start, centre, x: float, eps: float, handoff=None):
    """Same contract as :func:`pdelta_cp.chunk.preconditioner.write_keys` (float32). ``handoff``: see
    :class:`WriteKeys`."""
    args = [t.contiguous().float() for t in (k_hat, g_atk, beta_atk, A_start, centre)]
    p = WriteKeys.apply(*args, float(x), float(eps), handoff)
    # the stages keep k̂ (or its own recipe's inputs) and the small tensors for p, not p (see kernels/remade.py)
    return remade.register(p, functools.partial(_write_keys_again, x=float(x), eps=float(eps)), *args)
