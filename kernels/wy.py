"""The asymmetric WY/UT chunk stage for a scalar decay per token (PDN, PGDN): forward and backward.

Per chunk and value head (key tensors read from the key head hv // (HV/H)); Γ is the chunk-local cumulative
log-decay, D_ij = e^{Γ_i − Γ_j}:

    L = diag(β) (K̂ Pᵀ ⊙ D) strictly lower      T = (I + L)^-1   (forward substitution, float32)
    W = T diag(β e^Γ) K̂      U = T diag(β) V      P̃ = P ⊙ e^{Γ_C − Γ}      d = e^{Γ_C}

Backward (given dW, dU, dP̃, dd):
    dBk = Tᵀ dW,  dBv = Tᵀ dU,  dT = dW Bkᵀ + dU Bvᵀ,  dL = −Tᵀ dT Tᵀ (strictly lower)
    K̂ Pᵀ path: dK̂ += (β dL ⊙ D) P,  dP += (β dL ⊙ D)ᵀ K̂,  dβ_i += Σ_j dL_ij (K̂Pᵀ ⊙ D)_ij
    Γ collects: rowsum − colsum of dL ⊙ L, rowsum(dBk ⊙ Bk), −rowsum(dP̃ ⊙ P̃) (+ its total and dd·d on Γ_C).
Transposed products are formed from transposed loads or recomputed, never by transposing a dot result.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ..chunk.delta import wy_form
from ._triton_utils import INTERPRET
from .gram_channel import _rows, _rows_t
from .output import _store_value_tile, _value_tile, _value_tile_t, value_rows
from .stages import make_wy_stage

# The backward kernel passed the GPU tests on H100 (Triton 3.6.0, K/V up to 128 and odd sizes). Where it does
# not fit (shared memory) the stage recomputes its backward in PyTorch. PDELTA_TRITON_WY_BWD=0 forces that
# PyTorch backward (a switch for bisecting a suspected miscompile on another Triton version).
TRITON_WY_BACKWARD = INTERPRET or os.environ.get("PDELTA_TRITON_WY_BWD", "1") != "0"

C = 64


@triton.jit
def _invert_unit_lower(L, rc, C: tl.constexpr):
    """(I + L)^-1 for strictly lower L [C, C], by forward substitution on rows: T_i = e_i − L_i,: T."""
    T = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0).to(tl.float32)
    for i in range(1, C):
        l_row = tl.sum(tl.where(rc[:, None] == i, L, 0.0), axis=0)
        T = tl.where(rc[:, None] == i, T - tl.sum(l_row[:, None] * T, axis=0)[None, :], T)
    return T


@triton.jit
def _store_u(VV, vbase, vstride, vn, U, vrow, T, beta, rc, V: tl.constexpr, BV: tl.constexpr,
             PRECISION: tl.constexpr):
    """U = T diag(β) V by V tiles, T the whole [C, C] inverse (V at (vbase, vstride): see `value_rows`)."""
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        vv = _value_tile(VV, vbase, vstride, vn, rc, cols, mv)
        u = tl.dot(T, vv * beta[:, None], input_precision=PRECISION)
        tl.store(U + (vrow + rc[:, None]) * V + cols[None, :], u, mask=mv[None, :])


@triton.jit
def _wy_fwd_kernel(KH, P, VV, BETA, GAM, W, U, PT, TINV, DEC, H, HV, G, STARTS, LENS,
                   K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PRECISION: tl.constexpr, FROM_T: tl.constexpr = False, STREAM: tl.constexpr = 0,
                   STORE_U: tl.constexpr = True):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    beta = tl.load(BETA + vrow + rc)
    gam = tl.load(GAM + vrow + rc)
    kk = tl.load(KH + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    if FROM_T:  # the remake in backward (stages.make_wy_stage): T as the forward stored it
        T = tl.load(TINV + (vrow + rc[:, None]) * C + rc[None, :])
    else:
        p_t = tl.load(P + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0)
        strict = rc[:, None] > rc[None, :]
        decay = tl.exp(tl.where(strict, gam[:, None] - gam[None, :], 0.0))
        L = tl.where(strict, beta[:, None] * tl.dot(kk, p_t, input_precision=PRECISION) * decay, 0.0)
        T = _invert_unit_lower(L, rc, C)
        tl.store(TINV + (vrow + rc[:, None]) * C + rc[None, :], T)
    eg = tl.exp(gam)
    w = tl.dot(T, kk * (beta * eg)[:, None], input_precision=PRECISION)
    tl.store(W + (vrow + rc[:, None]) * K + rk[None, :], w, mask=mk[None, :])
    g_end = tl.sum(tl.where(rc == C - 1, gam, 0.0), axis=0)
    pp = tl.load(P + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    tl.store(PT + (vrow + rc[:, None]) * K + rk[None, :], pp * tl.exp(g_end - gam)[:, None], mask=mk[None, :])
    tl.store(DEC + i_c64 * HV + i_h, tl.exp(g_end))
    if STORE_U:  # (not where backward remakes for readers of the kept Δ only: stages.Recompute.without_u)
        vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
        _store_u(VV, vbase, vstride, vn, U, vrow, T, beta, rc, V, BV, PRECISION)


# --- the same forward in 16-row blocks: the default (PDELTA_WY_BLOCKED=0 restores the row kernel above) --------
# On one H200 (Triton 3.6.0, K = V = 128, 32K tokens × 16 heads) the row kernel takes 3.74 ms, this one 2.60 ms
# at 8 warps and 1.61 ms at 4 (fewer warps: cheaper cross-warp reductions in the 16-row substitutions), with the
# same error against float64 (docs/benchmarks, session f). Launched with 4 warps, for K <= 128 (_pick_wy_forward).
# (I + L)⁻¹ with L in 4×4 blocks of 16: each diagonal block inverted by 15 substitution steps on a 16×16 tile
# (instead of 63 steps on 64×64 tiles that need cross-warp reductions), then the off-diagonal blocks by
# T_ij = −T_ii Σ_{j<=k<i} L_ik T_kj (small products). W, U from the blocks: W_i = Σ_{j<=i} T_ij B_j.


@triton.jit
def _l_block(KH, P, GAM, BETA, krow, vrow, i0, j0, r16, rk, mk, K: tl.constexpr, DIAG: tl.constexpr,
             PRECISION: tl.constexpr):
    """L rows i0.., columns j0.. (16×16): β_i (k̂_i · p_j) e^{Γ_i − Γ_j}, strictly lower on the diagonal."""
    gi = tl.load(GAM + vrow + i0 + r16)
    gj = tl.load(GAM + vrow + j0 + r16)
    kp = tl.dot(_rows(KH, krow + i0, r16, rk, mk, K), _rows_t(P, krow + j0, r16, rk, mk, K), input_precision=PRECISION)
    if DIAG:
        low = r16[:, None] > r16[None, :]
        blk = tl.where(low, kp * tl.exp(tl.where(low, gi[:, None] - gj[None, :], 0.0)), 0.0)
    else:
        blk = kp * tl.exp(gi[:, None] - gj[None, :])
    return blk * tl.load(BETA + vrow + i0 + r16)[:, None]


@triton.jit
def _invert_unit_lower_16(L, r16, DOUBLING: tl.constexpr):
    """(I + L)^-1 of a strictly lower 16×16 L: row substitution, or (DOUBLING) the product
    (I − L)(I + L²)(I + L⁴)(I + L⁸) (L¹⁶ = 0) — six fp32 products instead of 15 dependent reduction steps."""
    if DOUBLING:
        eye = tl.where(r16[:, None] == r16[None, :], 1.0, 0.0).to(tl.float32)
        L2 = tl.dot(L, L, input_precision="ieee")
        L4 = tl.dot(L2, L2, input_precision="ieee")
        L8 = tl.dot(L4, L4, input_precision="ieee")
        T = tl.dot(eye - L, eye + L2, input_precision="ieee")
        T = tl.dot(T, eye + L4, input_precision="ieee")
        return tl.dot(T, eye + L8, input_precision="ieee")
    else:
        return _invert_unit_lower(L, r16, 16)


@triton.jit
def _neg_solve(Tii, acc, PRECISION: tl.constexpr):
    """−T_ii · acc, to about fp32 accuracy (errors here enter every later block)."""
    return -_accurate_dot(Tii, acc, PRECISION)


@triton.jit
def _accurate_dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "tf32":
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_block(TINV, vrow, i0, j0, r16, C: tl.constexpr):
    """The 16×16 block at rows i0.., columns j0.. of a [C, C] matrix per program (T's storage)."""
    return tl.load(TINV + (vrow + i0 + r16[:, None]) * C + j0 + r16[None, :])


@triton.jit
def _load_blocked_inverse(TINV, vrow, r16, C: tl.constexpr):
    """The ten blocks of a stored (I + L)^-1, in `_blocked_inverse`'s order."""
    return (_load_block(TINV, vrow, 0, 0, r16, C), _load_block(TINV, vrow, 16, 0, r16, C),
            _load_block(TINV, vrow, 16, 16, r16, C), _load_block(TINV, vrow, 32, 0, r16, C),
            _load_block(TINV, vrow, 32, 16, r16, C), _load_block(TINV, vrow, 32, 32, r16, C),
            _load_block(TINV, vrow, 48, 0, r16, C), _load_block(TINV, vrow, 48, 16, r16, C),
            _load_block(TINV, vrow, 48, 32, r16, C), _load_block(TINV, vrow, 48, 48, r16, C))


@triton.jit
def _store_t_block(TINV, vrow, i0, j0, blk, r16, C: tl.constexpr):
    tl.store(TINV + (vrow + i0 + r16[:, None]) * C + j0 + r16[None, :], blk)


@triton.jit
def _apply_t_rows(T0, T1, T2, T3, B0, B1, B2, B3, N: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_{j<N} T_j B_j for one row block (N = its index + 1; unused blocks are zero)."""
    out = tl.dot(T0, B0, input_precision=PRECISION)
    if N > 1:
        out += tl.dot(T1, B1, input_precision=PRECISION)
    if N > 2:
        out += tl.dot(T2, B2, input_precision=PRECISION)
    if N > 3:
        out += tl.dot(T3, B3, input_precision=PRECISION)
    return out


@triton.jit
def _blocked_inverse(L00, L11, L22, L33, L10, L20, L21, L30, L31, L32, r16, PRECISION: tl.constexpr,
                     DOUBLING: tl.constexpr):
    """The ten 16×16 blocks of (I + L)^-1 from the blocks of L (diagonal ones strictly lower), in the order
    T00, T10, T11, T20, T21, T22, T30, T31, T32, T33: T_ii by substitution, T_ij = −T_ii Σ_{k=j}^{i−1} L_ik T_kj."""
    T00 = _invert_unit_lower_16(L00, r16, DOUBLING)
    T11 = _invert_unit_lower_16(L11, r16, DOUBLING)
    T22 = _invert_unit_lower_16(L22, r16, DOUBLING)
    T33 = _invert_unit_lower_16(L33, r16, DOUBLING)
    T10 = _neg_solve(T11, _accurate_dot(L10, T00, PRECISION), PRECISION)
    T21 = _neg_solve(T22, _accurate_dot(L21, T11, PRECISION), PRECISION)
    T20 = _neg_solve(T22, _accurate_dot(L20, T00, PRECISION) + _accurate_dot(L21, T10, PRECISION), PRECISION)
    T32 = _neg_solve(T33, _accurate_dot(L32, T22, PRECISION), PRECISION)
    T31 = _neg_solve(T33, _accurate_dot(L31, T11, PRECISION) + _accurate_dot(L32, T21, PRECISION), PRECISION)
    T30 = _neg_solve(T33, _accurate_dot(L30, T00, PRECISION) + _accurate_dot(L31, T10, PRECISION)
                     + _accurate_dot(L32, T20, PRECISION), PRECISION)
    return T00, T10, T11, T20, T21, T22, T30, T31, T32, T33


@triton.jit
def _blocked_l_inverse(KH, P, GAM, BETA, krow, vrow, r16, rk, mk, K: tl.constexpr, PRECISION: tl.constexpr,
                       DOUBLING: tl.constexpr):
    """The ten 16×16 blocks of (I + L)^-1 (as `_blocked_inverse` orders them) for a scalar decay Γ [C]."""
    return _blocked_inverse(
        _l_block(KH, P, GAM, BETA, krow, vrow, 0, 0, r16, rk, mk, K, True, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 16, 16, r16, rk, mk, K, True, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 32, 32, r16, rk, mk, K, True, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 48, 48, r16, rk, mk, K, True, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 16, 0, r16, rk, mk, K, False, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 32, 0, r16, rk, mk, K, False, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 32, 16, r16, rk, mk, K, False, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 48, 0, r16, rk, mk, K, False, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 48, 16, r16, rk, mk, K, False, PRECISION),
        _l_block(KH, P, GAM, BETA, krow, vrow, 48, 32, r16, rk, mk, K, False, PRECISION), r16, PRECISION,
        DOUBLING)


@triton.jit
def _store_blocked_inverse(TINV, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, r16, C: tl.constexpr):
    """Write the [C, C] inverse (zeros above the diagonal blocks) for the backward."""
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_t_block(TINV, vrow, 0, 0, T00, r16, C)
    _store_t_block(TINV, vrow, 0, 16, zero, r16, C)
    _store_t_block(TINV, vrow, 0, 32, zero, r16, C)
    _store_t_block(TINV, vrow, 0, 48, zero, r16, C)
    _store_t_block(TINV, vrow, 16, 0, T10, r16, C)
    _store_t_block(TINV, vrow, 16, 16, T11, r16, C)
    _store_t_block(TINV, vrow, 16, 32, zero, r16, C)
    _store_t_block(TINV, vrow, 16, 48, zero, r16, C)
    _store_t_block(TINV, vrow, 32, 0, T20, r16, C)
    _store_t_block(TINV, vrow, 32, 16, T21, r16, C)
    _store_t_block(TINV, vrow, 32, 32, T22, r16, C)
    _store_t_block(TINV, vrow, 32, 48, zero, r16, C)
    _store_t_block(TINV, vrow, 48, 0, T30, r16, C)
    _store_t_block(TINV, vrow, 48, 16, T31, r16, C)
    _store_t_block(TINV, vrow, 48, 32, T32, r16, C)
    _store_t_block(TINV, vrow, 48, 48, T33, r16, C)


@triton.jit
def _store_blocked_product(OUT, row0, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, B0, B1, B2, B3, r16, cols,
                           mcols, N: tl.constexpr, PRECISION: tl.constexpr):
    """OUT rows row0.. (+64) = T B for B given as four 16-row blocks (columns ``cols`` of an [*, N] tensor)."""
    m = mcols[None, :]
    tl.store(OUT + (row0 + r16[:, None]) * N + cols[None, :],
             _apply_t_rows(T00, T00, T00, T00, B0, B0, B0, B0, 1, PRECISION), mask=m)
    tl.store(OUT + (row0 + 16 + r16[:, None]) * N + cols[None, :],
             _apply_t_rows(T10, T11, T11, T11, B0, B1, B1, B1, 2, PRECISION), mask=m)
    tl.store(OUT + (row0 + 32 + r16[:, None]) * N + cols[None, :],
             _apply_t_rows(T20, T21, T22, T22, B0, B1, B2, B2, 3, PRECISION), mask=m)
    tl.store(OUT + (row0 + 48 + r16[:, None]) * N + cols[None, :],
             _apply_t_rows(T30, T31, T32, T33, B0, B1, B2, B3, 4, PRECISION), mask=m)


@triton.jit
def _store_blocked_u(VV, vbase, vstride, vn, U, vrow, BETA, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, r16,
                     V: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """U = T diag(β) V by row blocks and V tiles (V at (vbase, vstride): see `value_rows`)."""
    b0 = tl.load(BETA + vrow + r16)
    b1 = tl.load(BETA + vrow + 16 + r16)
    b2 = tl.load(BETA + vrow + 32 + r16)
    b3 = tl.load(BETA + vrow + 48 + r16)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        _store_blocked_product(U, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
                               _value_tile(VV, vbase, vstride, vn, r16, cols, mv) * b0[:, None],
                               _value_tile(VV, vbase, vstride, vn, 16 + r16, cols, mv) * b1[:, None],
                               _value_tile(VV, vbase, vstride, vn, 32 + r16, cols, mv) * b2[:, None],
                               _value_tile(VV, vbase, vstride, vn, 48 + r16, cols, mv) * b3[:, None], r16, cols, mv, V,
                               PRECISION)


@triton.jit
def _wy_fwd_blocked_kernel(KH, P, VV, BETA, GAM, W, U, PT, TINV, DEC, H, HV, G, STARTS, LENS,
                           K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, PRECISION: tl.constexpr, DOUBLING: tl.constexpr = False,
                           FROM_T: tl.constexpr = False, STREAM: tl.constexpr = 0, STORE_U: tl.constexpr = True):
    tl.static_assert(C == 64, "four row blocks of 16")
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    r16 = tl.arange(0, 16)
    rk = tl.arange(0, BK)
    mk = rk < K
    if FROM_T:  # the remake in backward: T's blocks as the forward stored them
        T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _load_blocked_inverse(TINV, vrow, r16, C)
    else:
        T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _blocked_l_inverse(KH, P, GAM, BETA, krow, vrow, r16, rk,
                                                                              mk, K, PRECISION, DOUBLING)
        _store_blocked_inverse(TINV, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, r16, C)
    # W = T diag(β e^Γ) K̂ by row blocks
    be0 = tl.load(BETA + vrow + r16) * tl.exp(tl.load(GAM + vrow + r16))
    be1 = tl.load(BETA + vrow + 16 + r16) * tl.exp(tl.load(GAM + vrow + 16 + r16))
    be2 = tl.load(BETA + vrow + 32 + r16) * tl.exp(tl.load(GAM + vrow + 32 + r16))
    be3 = tl.load(BETA + vrow + 48 + r16) * tl.exp(tl.load(GAM + vrow + 48 + r16))
    _store_blocked_product(W, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
                           _rows(KH, krow, r16, rk, mk, K) * be0[:, None],
                           _rows(KH, krow + 16, r16, rk, mk, K) * be1[:, None],
                           _rows(KH, krow + 32, r16, rk, mk, K) * be2[:, None],
                           _rows(KH, krow + 48, r16, rk, mk, K) * be3[:, None], r16, rk, mk, K, PRECISION)
    # P̃ = P ⊙ e^{Γ_C − Γ}, d = e^{Γ_C}
    rc = tl.arange(0, C)
    gam = tl.load(GAM + vrow + rc)
    g_end = tl.sum(tl.where(rc == C - 1, gam, 0.0), axis=0)
    pp = tl.load(P + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    tl.store(PT + (vrow + rc[:, None]) * K + rk[None, :], pp * tl.exp(g_end - gam)[:, None], mask=mk[None, :])
    tl.store(DEC + i_c64 * HV + i_h, tl.exp(g_end))
    if STORE_U:  # (see the row kernel above)
        vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
        _store_blocked_u(VV, vbase, vstride, vn, U, vrow, BETA, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
                         r16, V, BV, PRECISION)


@triton.jit
def _value_side_backward(DU, VV, DV, vrow, vbase, vstride, vn, beta, T_t, rc, V: tl.constexpr, C: tl.constexpr,
                         BV: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr = True):
    """The U = T Bv part of a WY backward (Bv = diag(β) V), V in tiles: writes dV = β ⊙ Tᵀ dU (in dV's dtype; V and
    dV at (vbase, vstride), see `value_rows`) and returns the starts of dT (dU Bvᵀ), dTᵀ (Bv dUᵀ; zeros unless
    TRANSPOSED) and dβ (rowsum of Tᵀ dU ⊙ V)."""
    dT = tl.zeros([C, C], dtype=tl.float32)
    dT_t = tl.zeros([C, C], dtype=tl.float32)
    d_beta = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        du = tl.load(DU + (vrow + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0)
        vv_t = _value_tile_t(VV, vbase, vstride, vn, rc, cols, mv)
        dT += tl.dot(du, vv_t * beta[None, :], input_precision=PRECISION)
        d_bv = tl.dot(T_t, du, input_precision=PRECISION)
        vv = _value_tile(VV, vbase, vstride, vn, rc, cols, mv)
        _store_value_tile(DV, vbase, vstride, vn, rc, cols, mv, d_bv * beta[:, None])
        d_beta += tl.sum(d_bv * vv, axis=1)
        if TRANSPOSED:
            du_t = tl.load(DU + (vrow + rc[None, :]) * V + cols[:, None], mask=mv[:, None], other=0.0)
            dT_t += tl.dot(vv * beta[:, None], du_t, input_precision=PRECISION)
    return dT, dT_t, d_beta


@triton.jit
def _dl_from(M, dT, keep, PRECISION: tl.constexpr):
    """−M dT M where ``keep``: dL = −Tᵀ dT Tᵀ (M = Tᵀ, strictly lower) or dLᵀ = −T dTᵀ T (M = T, strictly upper)."""
    return tl.where(keep, -tl.dot(tl.dot(M, dT, input_precision=PRECISION), M, input_precision=PRECISION), 0.0)


@triton.jit
def _value_side_dl(KH, VV, GAM, TINV, DW, DU, DL, DV, DBETA, beta, krow, vrow, i_c64, i_h, HV, STARTS, LENS, rc, rk,
                   mk, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                   CHANNEL: tl.constexpr, STREAM: tl.constexpr):
    """The first half of a split WY backward (stages.split_wy_backward), scalar or per-channel (CHANNEL) decay: the
    value side (dV, and dβ's share from V into DBETA), dT = dU Bvᵀ + dW Bkᵀ and dL = −Tᵀ dT Tᵀ (strictly lower) into
    DL [Nc, HV, C, C]. What follows reads dL, and dLᵀ by a transposed load: no dTᵀ is accumulated (the one-kernel
    backward forms it by a second set of products, since a dot result is never transposed in registers)."""
    T_t = tl.load(TINV + (vrow + rc[None, :]) * C + rc[:, None])
    vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    dT, dT_t, d_beta = _value_side_backward(DU, VV, DV, vrow, vbase, vstride, vn, beta, T_t, rc, V, C, BV, PRECISION,
                                            False)
    if CHANNEL:  # Bk = β K̂ ⊙ e^Γ, Γ [C, K]
        bk_t = _rows_t(KH, krow, rc, rk, mk, K) * tl.exp(_rows_t(GAM, vrow, rc, rk, mk, K)) * beta[None, :]
    else:  # Bk = diag(β e^Γ) K̂, Γ [C]
        bk_t = _rows_t(KH, krow, rc, rk, mk, K) * (beta * tl.exp(tl.load(GAM + vrow + rc)))[None, :]
    dT += tl.dot(_rows(DW, vrow, rc, rk, mk, K), bk_t, input_precision=PRECISION)
    strict = rc[:, None] > rc[None, :]
    dL = _dl_from(T_t, dT, strict, PRECISION)
    tl.store(DL + (vrow + rc[:, None]) * C + rc[None, :], dL)
    tl.store(DBETA + vrow + rc, d_beta)


@triton.jit
def _wy_bwd_dl_kernel(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL, DP, DV, DBETA, DGAM, H, HV, G, STARTS, LENS,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PRECISION: tl.constexpr, ACCUMULATE_DP: tl.constexpr = False, STREAM: tl.constexpr = 0,
                      WITH_DP: tl.constexpr = False, KB: tl.constexpr = 0):
    """First half of the split scalar-decay WY backward (`_value_side_dl`); `_wy_bwd_kernel` with FROM_DL does the
    rest. (The same arguments as the channel one, `channel._wy_ch_bwd_dl_kernel`; P, DPT, DDEC, DP, DGAM unused.)"""
    tl.static_assert(not WITH_DP, "the P side stays in the key-side kernel for a scalar decay")
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    vrow = (i_c64 * HV + i_h) * C
    _value_side_dl(KH, VV, GAM, TINV, DW, DU, DL, DV, DBETA, tl.load(BETA + vrow + rc), (i_c64 * H + i_h // G) * C,
                   vrow, i_c64, i_h, HV, STARTS, LENS, rc, rk, rk < K, K, V, C, BV, PRECISION, False, STREAM)


@triton.jit
def _wy_bwd_kernel(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL,
                   DK, DP, DV, DBETA, DGAM, H, HV, G, STARTS, LENS,
                   K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PRECISION: tl.constexpr, ACCUMULATE_DP: tl.constexpr = False, STREAM: tl.constexpr = 0,
                   FROM_DL: tl.constexpr = False, DP_DONE: tl.constexpr = False, KB: tl.constexpr = 0):
    """Writes per-value-head dK̂ (read side), dP, and dV, dβ, dΓ. FROM_DL: the key side of the split backward —
    dL and dβ's value share as `_wy_bwd_dl_kernel` left them in DL and DBETA (dV written there too); with KB > 0
    (stages.wy_key_blocks, opt-in) in key-column blocks (`_keys_from_dl_blocked`). (DP_DONE: for the channel
    kernel's signature only.)

    Every [C, K] tile is (re)loaded right before the product that uses it: short lifetimes keep the shared
    memory that dot operands need within Hopper's limit.
    """
    tl.static_assert(not DP_DONE, "the P side stays in this kernel for a scalar decay")
    if FROM_DL and KB > 0:
        _keys_from_dl_blocked(KH, P, BETA, GAM, TINV, DW, DPT, DDEC, DL, DK, DP, DBETA, DGAM, H, HV, G, K, C, BK, KB,
                              PRECISION, ACCUMULATE_DP)
    else:
        _wy_bwd_body(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL, DK, DP, DV, DBETA, DGAM, H, HV, G, STARTS, LENS,
                     K, V, C, BK, BV, PRECISION, ACCUMULATE_DP, STREAM, FROM_DL)


@triton.jit
def _wy_bwd_body(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL, DK, DP, DV, DBETA, DGAM, H, HV, G, STARTS, LENS,
                 K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 PRECISION: tl.constexpr, ACCUMULATE_DP: tl.constexpr, STREAM: tl.constexpr,
                 FROM_DL: tl.constexpr):
    """`_wy_bwd_kernel` over whole [C, K] tiles (one kernel, or the key side of the split backward)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    beta = tl.load(BETA + vrow + rc)
    gam = tl.load(GAM + vrow + rc)
    eg = tl.exp(gam)
    be = beta * eg
    g_end = tl.sum(tl.where(rc == C - 1, gam, 0.0), axis=0)
    T_t = tl.load(TINV + (vrow + rc[None, :]) * C + rc[:, None])
    if FROM_DL:
        d_beta = tl.load(DBETA + vrow + rc)
    else:
        # value side: dBv = Tᵀ dU -> dV, dβ; dT = dU Bvᵀ (+ dW Bkᵀ below) and dTᵀ = Bv dUᵀ (+ Bk dWᵀ)
        vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
        dT, dT_t, d_beta = _value_side_backward(DU, VV, DV, vrow, vbase, vstride, vn, beta, T_t, rc, V, C, BV,
                                                PRECISION)
        dT += tl.dot(_rows(DW, vrow, rc, rk, mk, K), _rows_t(KH, krow, rc, rk, mk, K) * be[None, :],
                     input_precision=PRECISION)
        dT_t += tl.dot(_rows(KH, krow, rc, rk, mk, K) * be[:, None], _rows_t(DW, vrow, rc, rk, mk, K),
                       input_precision=PRECISION)
    # key side of W = T Bk: dBk = Tᵀ dW
    d_bk = tl.dot(T_t, _rows(DW, vrow, rc, rk, mk, K), input_precision=PRECISION)
    kk = _rows(KH, krow, rc, rk, mk, K)
    d_beta += tl.sum(d_bk * kk * eg[:, None], axis=1)
    d_gam = tl.sum(d_bk * kk, axis=1) * be
    d_k = d_bk * be[:, None]
    # dL = −Tᵀ dT Tᵀ (strictly lower) and dLᵀ = −T dTᵀ T (strictly upper)
    strict = rc[:, None] > rc[None, :]
    strict_t = rc[:, None] < rc[None, :]
    if FROM_DL:
        dL = tl.load(DL + (vrow + rc[:, None]) * C + rc[None, :])
    else:
        dL = _dl_from(T_t, dT, strict, PRECISION)
        T = tl.load(TINV + (vrow + rc[:, None]) * C + rc[None, :])
        dL_t = _dl_from(T, dT_t, strict_t, PRECISION)
    # L = diag(β) (K̂Pᵀ ⊙ D): with Y = (dL ⊙ D) P, dK̂ gets β ⊙ Y and rowsum(dL ⊙ L) = β ⊙ rowsum(K̂ ⊙ Y); with
    # Z = (dLᵀ ⊙ Dᵀ) diag(β) K̂, dP = Z and colsum(dL ⊙ L) = rowsum(P ⊙ Z) — K̂Pᵀ itself is never formed
    decay = tl.exp(tl.where(strict, gam[:, None] - gam[None, :], 0.0))
    y = tl.dot(tl.where(strict, dL * decay, 0.0), _rows(P, krow, rc, rk, mk, K), input_precision=PRECISION)
    gl = tl.sum(_rows(KH, krow, rc, rk, mk, K) * y, axis=1)
    d_beta += gl
    d_gam += gl * beta  # rowsum of dL ⊙ L
    d_k += y * beta[:, None]
    tl.store(DK + (vrow + rc[:, None]) * K + rk[None, :], d_k, mask=mk[None, :])
    decay_t = tl.exp(tl.where(strict_t, gam[None, :] - gam[:, None], 0.0))
    if FROM_DL:  # dLᵀ straight from memory, loaded where it is used
        dL_t = tl.load(DL + (vrow + rc[None, :]) * C + rc[:, None])
    d_p = tl.dot(tl.where(strict_t, dL_t * beta[None, :] * decay_t, 0.0), _rows(KH, krow, rc, rk, mk, K),
                 input_precision=PRECISION)
    d_gam -= tl.sum(_rows(P, krow, rc, rk, mk, K) * d_p, axis=1)  # colsum of dL ⊙ L
    # P̃ = P ⊙ e^{Γ_C − Γ} and d = e^{Γ_C}
    scale_end = tl.exp(g_end - gam)
    dpt = _rows(DPT, vrow, rc, rk, mk, K)
    d_p += dpt * scale_end[:, None]
    s = tl.sum(dpt * _rows(P, krow, rc, rk, mk, K), axis=1) * scale_end
    d_gam -= s
    d_end = tl.sum(s, axis=0) + tl.load(DDEC + i_c64 * HV + i_h) * tl.exp(g_end)
    d_gam += tl.where(rc == C - 1, d_end, 0.0)
    dp_at = DP + (vrow + rc[:, None]) * K + rk[None, :]
    if ACCUMULATE_DP:  # the output stage's dP (stages.GradHandoff): return the sum in its buffer
        d_p += tl.load(dp_at, mask=mk[None, :], other=0.0)
    tl.store(dp_at, d_p, mask=mk[None, :])
    tl.store(DBETA + vrow + rc, d_beta)
    tl.store(DGAM + vrow + rc, d_gam)



@triton.jit
def _keys_from_dl_blocked(KH, P, BETA, GAM, TINV, DW, DPT, DDEC, DL, DK, DP, DBETA, DGAM, H, HV, G, K: tl.constexpr,
                          C: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, PRECISION: tl.constexpr,
                          ACCUMULATE_DP: tl.constexpr):
    """The key side of the split scalar-decay WY backward in key-column blocks of KB: dK̂, dP (per column) and the
    row sums of dβ, dΓ (accumulated over blocks), from dL and dLᵀ as `_wy_bwd_dl_kernel` left them — the same terms
    as `_wy_bwd_body` with FROM_DL, [C, KB] tiles instead of [C, BK]."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    beta = tl.load(BETA + vrow + rc)
    gam = tl.load(GAM + vrow + rc)
    eg = tl.exp(gam)
    be = beta * eg
    g_end = tl.sum(tl.where(rc == C - 1, gam, 0.0), axis=0)
    scale_end = tl.exp(g_end - gam)
    T_t = tl.load(TINV + (vrow + rc[None, :]) * C + rc[:, None])
    strict = rc[:, None] > rc[None, :]
    strict_t = rc[:, None] < rc[None, :]
    # (dL ⊙ D) and (dLᵀ ⊙ Dᵀ) diag(β), both [C, C], kept across the blocks
    dl_d = tl.where(strict, tl.load(DL + (vrow + rc[:, None]) * C + rc[None, :])
                    * tl.exp(tl.where(strict, gam[:, None] - gam[None, :], 0.0)), 0.0)
    dlt_d = tl.where(strict_t, tl.load(DL + (vrow + rc[None, :]) * C + rc[:, None]) * beta[None, :]
                     * tl.exp(tl.where(strict_t, gam[None, :] - gam[:, None], 0.0)), 0.0)
    d_beta = tl.load(DBETA + vrow + rc)
    d_gam = tl.zeros([C], dtype=tl.float32)
    s_tot = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, BK, KB):  # a loop, not unrolled: one block of columns live at a time
        rk = k0 + tl.arange(0, KB)
        mk = rk < K
        kk = _rows(KH, krow, rc, rk, mk, K)
        pp = _rows(P, krow, rc, rk, mk, K)
        d_bk = tl.dot(T_t, _rows(DW, vrow, rc, rk, mk, K), input_precision=PRECISION)
        kb_sum = tl.sum(d_bk * kk, axis=1)
        y = tl.dot(dl_d, pp, input_precision=PRECISION)
        gl = tl.sum(kk * y, axis=1)
        d_beta += kb_sum * eg + gl
        d_gam += kb_sum * be + gl * beta
        at = (vrow + rc[:, None]) * K + rk[None, :]
        tl.store(DK + at, d_bk * be[:, None] + y * beta[:, None], mask=mk[None, :])
        d_p = tl.dot(dlt_d, kk, input_precision=PRECISION)
        dpt = _rows(DPT, vrow, rc, rk, mk, K)
        s = tl.sum(dpt * pp, axis=1) * scale_end
        d_gam -= tl.sum(pp * d_p, axis=1) + s
        s_tot += s
        d_p += dpt * scale_end[:, None]
        if ACCUMULATE_DP:  # the output stage's dP (stages.GradHandoff): return the sum in its buffer
            d_p += tl.load(DP + at, mask=mk[None, :], other=0.0)
        tl.store(DP + at, d_p, mask=mk[None, :])
    d_end = tl.sum(s_tot, axis=0) + tl.load(DDEC + i_c64 * HV + i_h) * tl.exp(g_end)
    d_gam += tl.where(rc == C - 1, d_end, 0.0)
    tl.store(DBETA + vrow + rc, d_beta)
    tl.store(DGAM + vrow + rc, d_gam)


def _wy_torch(k_hat, p, v, beta, gamma):
    """The stage in PyTorch (value-head layout), with d as [Nc, HV]."""
    G = v.shape[1] // k_hat.shape[1]
    k_v, p_v = (t.repeat_interleave(G, dim=1) if G > 1 else t for t in (k_hat, p))
    W, U, P_t, d = wy_form(k_v, p_v, v, beta, gamma[..., None])
    return W, U, P_t, d[..., 0]


def _pick_wy_forward(K: int):
    """The blocked forward at 4 warps up to K = 128 (GPU-verified there); the row kernel for larger keys, where
    the blocked kernel's four [16, K] tiles per operand have not been tried on a GPU, or when
    PDELTA_WY_BLOCKED=0."""
    if os.environ.get("PDELTA_WY_BLOCKED") == "0" or K > 128:
        return _wy_fwd_kernel, None
    return _wy_fwd_blocked_kernel, 4


wy_scalar_decay = make_wy_stage("wy", _wy_fwd_kernel, _wy_bwd_kernel, _wy_torch, dl_kernel=_wy_bwd_dl_kernel,
                                decay_shape=lambda Nc, HV, K: (Nc, HV),
                                kernel_backward=lambda: TRITON_WY_BACKWARD, pick_fwd=_pick_wy_forward)
