"""WY/UT and output stages for a per-channel decay (PKDA): forward and backward, as Triton kernels.

Same algebra as :mod:`.wy` and :mod:`.output` with Γ of shape [C, K] (the decay scales the key channels):
    L = diag(β) X,  X = gram_strict(K̂, P, Γ);  T = (I + L)^-1;  W = T (β K̂ ⊙ e^Γ);  U = T (β V)
    P̃ = P ⊙ e^{Γ_C − Γ};  d = e^{Γ_C} ∈ R^K;   O = (Q̂ ⊙ e^Γ) S + gram(Q̂, P, Γ) (U − W S)
The Gram matrices and their backward come from :mod:`.gram_channel`; for a gram with rows a and columns b
the decay gradient is dΓ = a ⊙ da − b ⊙ db.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (triton.jit)
import triton.language as tl

from ..chunk.delta import wy_form
from ..chunk.gram import gram
from .output import (_store_value_tile, _value_tile, _value_tile_t, delta_rows, delta_rows_t, mm, state_tile,
                     state_tile_t, transpose_via, value_rows)
from ._triton_utils import next_pow2
from .stages import make_output_stage, make_wy_stage, output_key_blocks, wy_key_blocks
from .gram_channel import (_rows, _rows_t, gram_apply_lower, gram_apply_upper, gram_blocked, gram_lower,
                           gram_upper)
from .wy import (_blocked_inverse, _invert_unit_lower, _load_block, _load_blocked_inverse, _store_blocked_inverse,
                 _store_blocked_product, _store_blocked_u, _store_u, _value_side_backward, _value_side_dl, _dl_from)

C = 64


@triton.jit
def _wy_ch_fwd_kernel(KH, P, VV, BETA, GAM, W, U, PT, TINV, DEC, H, HV, G, STARTS, LENS,
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
    if FROM_T:  # the remake in backward (stages.make_wy_stage): T as the forward stored it
        T = tl.load(TINV + (vrow + rc[:, None]) * C + rc[None, :])
    else:
        L = beta[:, None] * gram_lower(KH, krow, P, krow, GAM, vrow, rc, rk, mk, K, C, True, PRECISION)
        T = _invert_unit_lower(L, rc, C)
        tl.store(TINV + (vrow + rc[:, None]) * C + rc[None, :], T)
    ga = _rows(GAM, vrow, rc, rk, mk, K)
    w = tl.dot(T, _rows(KH, krow, rc, rk, mk, K) * tl.exp(ga) * beta[:, None], input_precision=PRECISION)
    tl.store(W + (vrow + rc[:, None]) * K + rk[None, :], w, mask=mk[None, :])
    g_end = tl.load(GAM + (vrow + C - 1) * K + rk, mask=mk, other=0.0)
    p_t = _rows(P, krow, rc, rk, mk, K) * tl.exp(g_end[None, :] - ga)
    tl.store(PT + (vrow + rc[:, None]) * K + rk[None, :], p_t, mask=mk[None, :])
    tl.store(DEC + (i_c64 * HV + i_h) * K + rk, tl.exp(g_end), mask=mk)
    if STORE_U:  # (not where backward remakes for readers of the kept Δ only: stages.Recompute.without_u)
        vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
        _store_u(VV, vbase, vstride, vn, U, vrow, T, beta, rc, V, BV, PRECISION)


@triton.jit
def _store_w_pt(KH, P, GAM, BETA, W, PT, DEC, krow, vrow, dec_row, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
                r16, rc, rk, mk, K: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
    """W = T (β K̂ ⊙ e^Γ) by row blocks, P̃ = P ⊙ e^{Γ_C − Γ} and d = e^{Γ_C}, for the key columns ``rk``."""
    _store_blocked_product(
        W, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
        _rows(KH, krow, r16, rk, mk, K) * tl.exp(_rows(GAM, vrow, r16, rk, mk, K))
        * tl.load(BETA + vrow + r16)[:, None],
        _rows(KH, krow + 16, r16, rk, mk, K) * tl.exp(_rows(GAM, vrow + 16, r16, rk, mk, K))
        * tl.load(BETA + vrow + 16 + r16)[:, None],
        _rows(KH, krow + 32, r16, rk, mk, K) * tl.exp(_rows(GAM, vrow + 32, r16, rk, mk, K))
        * tl.load(BETA + vrow + 32 + r16)[:, None],
        _rows(KH, krow + 48, r16, rk, mk, K) * tl.exp(_rows(GAM, vrow + 48, r16, rk, mk, K))
        * tl.load(BETA + vrow + 48 + r16)[:, None], r16, rk, mk, K, PRECISION)
    g_end = tl.load(GAM + (vrow + C - 1) * K + rk, mask=mk, other=0.0)
    p_t = _rows(P, krow, rc, rk, mk, K) * tl.exp(g_end[None, :] - _rows(GAM, vrow, rc, rk, mk, K))
    tl.store(PT + (vrow + rc[:, None]) * K + rk[None, :], p_t, mask=mk[None, :])
    tl.store(DEC + dec_row * K + rk, tl.exp(g_end), mask=mk)


@triton.jit
def _wy_ch_fwd_blocked_kernel(KH, P, VV, BETA, GAM, W, U, PT, TINV, DEC, H, HV, G, STARTS, LENS,
                              K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, PRECISION: tl.constexpr, FROM_T: tl.constexpr = False,
                              STREAM: tl.constexpr = 0, KB: tl.constexpr = 0, STORE_U: tl.constexpr = True):
    """As `_wy_ch_fwd_kernel`, with (I + L)^-1 by 16-row blocks (wy.py's blocked solve) instead of 63 cross-warp
    substitution steps on the [C, C] tile: L goes through TINV's storage (16 KB, cache-resident), which then
    takes the inverse. KB > 0 (stages.wy_key_blocks, opt-in): the Gram summed over key-column blocks of KB, and W,
    P̃, d written block by block ([C, KB] tiles instead of [C, BK])."""
    tl.static_assert(C == 64, "four row blocks of 16")
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    r16 = tl.arange(0, 16)
    rk = tl.arange(0, BK)
    mk = rk < K
    if FROM_T:  # the remake in backward: T's blocks as the forward stored them
        T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _load_blocked_inverse(TINV, vrow, r16, C)
    else:
        beta = tl.load(BETA + vrow + rc)
        if KB == 0:
            L = beta[:, None] * gram_lower(KH, krow, P, krow, GAM, vrow, rc, rk, mk, K, C, True, PRECISION)
        else:
            L = beta[:, None] * gram_blocked(KH, krow, P, krow, GAM, vrow, rc, K, C, BK, KB, True, PRECISION, False)
        tl.store(TINV + (vrow + rc[:, None]) * C + rc[None, :], L)
        tl.debug_barrier()  # the blocks below are read by other threads than wrote them
        T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _blocked_inverse(
            _load_block(TINV, vrow, 0, 0, r16, C), _load_block(TINV, vrow, 16, 16, r16, C),
            _load_block(TINV, vrow, 32, 32, r16, C), _load_block(TINV, vrow, 48, 48, r16, C),
            _load_block(TINV, vrow, 16, 0, r16, C), _load_block(TINV, vrow, 32, 0, r16, C),
            _load_block(TINV, vrow, 32, 16, r16, C), _load_block(TINV, vrow, 48, 0, r16, C),
            _load_block(TINV, vrow, 48, 16, r16, C), _load_block(TINV, vrow, 48, 32, r16, C), r16, PRECISION,
            False)
        tl.debug_barrier()  # every L block is read before the inverse overwrites them
        _store_blocked_inverse(TINV, vrow, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, r16, C)
    if KB == 0:
        _store_w_pt(KH, P, GAM, BETA, W, PT, DEC, krow, vrow, i_c64 * HV + i_h, T00, T10, T11, T20, T21, T22, T30,
                    T31, T32, T33, r16, rc, rk, mk, K, C, PRECISION)
    else:
        for k0 in range(0, BK, KB):  # a loop, not unrolled: one block of columns live at a time
            rkb = k0 + tl.arange(0, KB)
            _store_w_pt(KH, P, GAM, BETA, W, PT, DEC, krow, vrow, i_c64 * HV + i_h, T00, T10, T11, T20, T21, T22,
                        T30, T31, T32, T33, r16, rc, rkb, rkb < K, K, C, PRECISION)
    if STORE_U:
        vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
        _store_blocked_u(VV, vbase, vstride, vn, U, vrow, BETA, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33,
                         r16, V, BV, PRECISION)


@triton.jit
def _dp_side(KH, P, GAM, DPT, DDEC, DP, dL_t, beta, ga, d_gam, krow, vrow, i_c64, i_h, HV, rc, rk, mk,
             K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
             ACCUMULATE_DP: tl.constexpr):
    """The P side of the channel WY backward, from dLᵀ (masked strictly upper): writes dP (added to the output
    stage's where ACCUMULATE_DP) and returns ``d_gam`` [C, BK] plus its share of dΓ — from the Gram's columns,
    P̃ = P ⊙ e^{Γ_C − Γ} and d = e^{Γ_C} (in the one-kernel backward's order of operations)."""
    d_p = gram_apply_upper(dL_t * beta[None, :], KH, krow, GAM, vrow, rc, rk, mk, K, C, BK, True, PRECISION)
    pp = _rows(P, krow, rc, rk, mk, K)
    d_gam -= pp * d_p
    g_end = tl.load(GAM + (vrow + C - 1) * K + rk, mask=mk, other=0.0)
    scale_end = tl.exp(g_end[None, :] - ga)
    dpt = _rows(DPT, vrow, rc, rk, mk, K)
    d_p += dpt * scale_end
    t = dpt * pp * scale_end
    d_gam -= t
    d_end = tl.sum(t, axis=0) + tl.load(DDEC + (i_c64 * HV + i_h) * K + rk, mask=mk, other=0.0) * tl.exp(g_end)
    d_gam += tl.where(rc[:, None] == C - 1, d_end[None, :], 0.0)
    dp_at = DP + (vrow + rc[:, None]) * K + rk[None, :]
    if ACCUMULATE_DP:  # the output stage's dP (stages.GradHandoff): return the sum in its buffer
        d_p += tl.load(dp_at, mask=mk[None, :], other=0.0)
    tl.store(dp_at, d_p, mask=mk[None, :])
    return d_gam


@triton.jit
def _wy_ch_bwd_dl_kernel(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL, DP, DV, DBETA, DGAM, H, HV, G, STARTS,
                         LENS, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         PRECISION: tl.constexpr, ACCUMULATE_DP: tl.constexpr = False, STREAM: tl.constexpr = 0,
                         WITH_DP: tl.constexpr = False, KB: tl.constexpr = 32):
    """First half of the split channel WY backward (stages.split_wy_backward): the value side and dL into DL (as
    wy.py's `_wy_bwd_dl_kernel`). WITH_DP (stages.wy_dp_in_dl, opt-in): then — dLᵀ read back from DL — the P side
    too (`_dp_side`, in key-column blocks of KB: every term is separable over key columns): dP, and dΓ's share in
    DGAM for the key side (`_wy_ch_bwd_kernel` with DP_DONE) to add to, so that each kernel holds one Gram apply."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    beta = tl.load(BETA + vrow + rc)
    _value_side_dl(KH, VV, GAM, TINV, DW, DU, DL, DV, DBETA, beta, krow, vrow, i_c64, i_h, HV, STARTS, LENS, rc, rk,
                   mk, K, V, C, BV, PRECISION, True, STREAM)
    if WITH_DP:
        tl.debug_barrier()  # dL's rows were stored by other threads than read them transposed
        dL_t = tl.load(DL + (vrow + rc[None, :]) * C + rc[:, None])  # (strictly upper: DL is strictly lower)
        for k0 in range(0, BK, KB):  # a loop, not unrolled: one block live at a time
            rkb = k0 + tl.arange(0, KB)
            mkb = rkb < K
            d_gam = _dp_side(KH, P, GAM, DPT, DDEC, DP, dL_t, beta, _rows(GAM, vrow, rc, rkb, mkb, K),
                             tl.zeros([C, KB], dtype=tl.float32), krow, vrow, i_c64, i_h, HV, rc, rkb, mkb, K, C, KB,
                             PRECISION, ACCUMULATE_DP)
            tl.store(DGAM + (vrow + rc[:, None]) * K + rkb[None, :], d_gam, mask=mkb[None, :])


@triton.jit
def _keys_after_dp(KH, P, BETA, GAM, TINV, DW, DL, DK, DBETA, DGAM, H, HV, G, K: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, KB: tl.constexpr, PRECISION: tl.constexpr):
    """The key side of the split channel WY backward after a dL kernel that did the P side (WITH_DP), in key-column
    blocks of KB ([C, KB] tiles instead of [C, BK]: every term is separable over key columns). With Bk = β K̂ ⊙ e^Γ
    and dX = β ⊙ dL: dK̂ = β ⊙ (e^Γ ⊙ Tᵀ dW + gram_apply_lower(dL, P)), dΓ += K̂ ⊙ dK̂ (the P share is in DGAM),
    dβ += rowsums of K̂ ⊙ (e^Γ ⊙ Tᵀ dW + gram_apply_lower(dL, P)) (the value share is in DBETA)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    rc = tl.arange(0, C)
    beta = tl.load(BETA + vrow + rc)
    T_t = tl.load(TINV + (vrow + rc[None, :]) * C + rc[:, None])
    dL = tl.load(DL + (vrow + rc[:, None]) * C + rc[None, :])
    d_beta = tl.load(DBETA + vrow + rc)
    for k0 in range(0, BK, KB):  # a loop, not unrolled: one block live at a time
        rk = k0 + tl.arange(0, KB)
        mk = rk < K
        kk = _rows(KH, krow, rc, rk, mk, K)
        g = tl.dot(T_t, _rows(DW, vrow, rc, rk, mk, K), input_precision=PRECISION) * tl.exp(
            _rows(GAM, vrow, rc, rk, mk, K))
        g += gram_apply_lower(dL, P, krow, GAM, vrow, rc, rk, mk, K, C, KB, True, PRECISION)
        d_beta += tl.sum(kk * g, axis=1)
        d_k = g * beta[:, None]
        at = (vrow + rc[:, None]) * K + rk[None, :]
        tl.store(DK + at, d_k, mask=mk[None, :])
        tl.store(DGAM + at, kk * d_k + tl.load(DGAM + at, mask=mk[None, :], other=0.0), mask=mk[None, :])
    tl.store(DBETA + vrow + rc, d_beta)


@triton.jit
def _wy_ch_bwd_kernel(KH, P, VV, BETA, GAM, TINV, DW, DU, DPT, DDEC, DL,
                      DK, DP, DV, DBETA, DGAM, H, HV, G, STARTS, LENS,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PRECISION: tl.constexpr, ACCUMULATE_DP: tl.constexpr = False, STREAM: tl.constexpr = 0,
                      FROM_DL: tl.constexpr = False, DP_DONE: tl.constexpr = False, KB: tl.constexpr = 32):
    """As wy.py's `_wy_bwd_kernel`, for Γ [C, K]; FROM_DL: the key side of the split backward (dL, dβ's value share
    and dV from `_wy_ch_bwd_dl_kernel`); DP_DONE: that kernel did the P side too (dP, and dΓ's share in DGAM), and
    the key side runs in key-column blocks of KB (`_keys_after_dp`)."""
    tl.static_assert(FROM_DL or not DP_DONE, "DP_DONE reads what the dL kernel left: only with FROM_DL")
    if DP_DONE:
        _keys_after_dp(KH, P, BETA, GAM, TINV, DW, DL, DK, DBETA, DGAM, H, HV, G, K, C, BK, KB, PRECISION)
    else:
        i_c, i_h = tl.program_id(0), tl.program_id(1)
        i_c64 = i_c.to(tl.int64)
        krow = (i_c64 * H + i_h // G) * C
        vrow = (i_c64 * HV + i_h) * C
        rc = tl.arange(0, C)
        rk = tl.arange(0, BK)
        mk = rk < K
        beta = tl.load(BETA + vrow + rc)
        T_t = tl.load(TINV + (vrow + rc[None, :]) * C + rc[:, None])
        ga = _rows(GAM, vrow, rc, rk, mk, K)
        if FROM_DL:
            d_beta = tl.load(DBETA + vrow + rc)
            kk = _rows(KH, krow, rc, rk, mk, K)
        else:
            vbase, vstride, vn = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
            dT, dT_t, d_beta = _value_side_backward(DU, VV, DV, vrow, vbase, vstride, vn, beta, T_t, rc, V, C, BV,
                                                    PRECISION)
            # Bk = β K̂ ⊙ e^Γ and its transpose, from transposed loads
            bk_t = _rows_t(KH, krow, rc, rk, mk, K) * tl.exp(_rows_t(GAM, vrow, rc, rk, mk, K)) * beta[None, :]
            dT += tl.dot(_rows(DW, vrow, rc, rk, mk, K), bk_t, input_precision=PRECISION)
            kk = _rows(KH, krow, rc, rk, mk, K)
            dT_t += tl.dot(kk * tl.exp(ga) * beta[:, None], _rows_t(DW, vrow, rc, rk, mk, K), input_precision=PRECISION)
        d_bk = tl.dot(T_t, _rows(DW, vrow, rc, rk, mk, K), input_precision=PRECISION)
        d_beta += tl.sum(d_bk * kk * tl.exp(ga), axis=1)
        d_gam = d_bk * kk * tl.exp(ga) * beta[:, None]
        d_k = d_bk * tl.exp(ga) * beta[:, None]
        strict = rc[:, None] > rc[None, :]
        strict_t = rc[:, None] < rc[None, :]
        if FROM_DL:
            dL = tl.load(DL + (vrow + rc[:, None]) * C + rc[None, :])
        else:
            dL = _dl_from(T_t, dT, strict, PRECISION)
            T = tl.load(TINV + (vrow + rc[:, None]) * C + rc[None, :])
            dL_t = _dl_from(T, dT_t, strict_t, PRECISION)
        # L = diag(β) X with X = gram(K̂, P): dX = β ⊙ dL, and β's share Σ_j dL_ij X_ij = Σ_d k̂_id (Σ_j dL_ij P_jd
        # e^{Γ_id − Γ_jd}) comes from the same apply, row-scaled afterwards: X itself is never formed
        d_x = gram_apply_lower(dL, P, krow, GAM, vrow, rc, rk, mk, K, C, BK, True, PRECISION)
        d_beta += tl.sum(kk * d_x, axis=1)
        d_k_gram = d_x * beta[:, None]
        d_k += d_k_gram
        d_gam += kk * d_k_gram
        tl.store(DK + (vrow + rc[:, None]) * K + rk[None, :], d_k, mask=mk[None, :])
        if DP_DONE:  # the dL kernel did the P side (dP) and left its share of dΓ
            d_gam += tl.load(DGAM + (vrow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
        else:
            if FROM_DL:  # dLᵀ straight from memory, loaded where it is used
                dL_t = tl.load(DL + (vrow + rc[None, :]) * C + rc[:, None])
            d_gam = _dp_side(KH, P, GAM, DPT, DDEC, DP, dL_t, beta, ga, d_gam, krow, vrow, i_c64, i_h, HV, rc, rk, mk,
                             K, C, BK, PRECISION, ACCUMULATE_DP)
        tl.store(DBETA + vrow + rc, d_beta)
        tl.store(DGAM + (vrow + rc[:, None]) * K + rk[None, :], d_gam, mask=mk[None, :])


@triton.jit
def _out_ch_fwd_kernel(Q, P, GAM, W, U, S, DELTA, O, H, HV, G, STARTS, LENS,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PRECISION: tl.constexpr, STREAM: tl.constexpr = 0, HAS_DELTA: tl.constexpr = False,
                       KB: tl.constexpr = 0):
    """One program per chunk and value head: the per-channel-decay Gram A once, then every V block (HAS_DELTA: as
    output.py's `_out_fwd_kernel`). KB > 0 (stages.output_key_blocks): A and the products over the key dimension
    summed over key-column blocks of KB ([C, KB] tiles instead of [C, BK])."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    if KB == 0:
        A = gram_lower(Q, krow, P, krow, GAM, vrow, rc, rk, mk, K, C, False, PRECISION)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mv = cols < V
            s = state_tile(S, srow, V, rk, cols, mk, mv)
            u = tl.load(U + (vrow + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
            delta = delta_rows(DELTA, u, _rows(W, vrow, rc, rk, mk, K), s, vrow, rc, cols, mv, V, HAS_DELTA,
                               PRECISION)
            qd = _rows(Q, krow, rc, rk, mk, K) * tl.exp(_rows(GAM, vrow, rc, rk, mk, K))
            o = tl.dot(qd, s, input_precision=PRECISION) + tl.dot(A, delta, input_precision=PRECISION)
            _store_value_tile(O, orow, ostride, on, rc, cols, mv, o)
    else:
        A = gram_blocked(Q, krow, P, krow, GAM, vrow, rc, K, C, BK, KB, False, PRECISION, False)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mv = cols < V
            # Δ = U − W S (or as kept) and (Q̂ ⊙ e^Γ) S, both summed over key-column blocks
            delta = tl.load((DELTA if HAS_DELTA else U) + (vrow + rc[:, None]) * V + cols[None, :], mask=mv[None, :],
                            other=0.0).to(tl.float32)
            o = tl.zeros([C, BV], dtype=tl.float32)
            for k0 in range(0, BK, KB):  # a loop, not unrolled: one block of columns live at a time
                rkb = k0 + tl.arange(0, KB)
                mkb = rkb < K
                s = state_tile(S, srow, V, rkb, cols, mkb, mv)
                qd = _rows(Q, krow, rc, rkb, mkb, K) * tl.exp(_rows(GAM, vrow, rc, rkb, mkb, K))
                o += tl.dot(qd, s, input_precision=PRECISION)
                if not HAS_DELTA:
                    delta -= tl.dot(_rows(W, vrow, rc, rkb, mkb, K), s, input_precision=PRECISION)
            o += tl.dot(A, delta, input_precision=PRECISION)
            _store_value_tile(O, orow, ostride, on, rc, cols, mv, o)


@triton.jit
def _out_ch_bwd_state_kernel(Q, P, GAM, W, S, DO, DW, DU, DS, H, HV, G, STARTS, LENS,
                             K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, PRECISION: tl.constexpr, STREAM: tl.constexpr = 0,
                             STORE_DW: tl.constexpr = True, KB: tl.constexpr = 0):
    """As output.py's `_out_bwd_state_kernel` (not STORE_DW: dW left to the state pass). KB > 0
    (stages.output_key_blocks, without STORE_DW): Aᵀ summed over key-column blocks of KB and dS written by them."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    if KB > 0:
        tl.static_assert(not STORE_DW, "key-column blocks only where the state pass forms dW (stages.fused_dw)")
        A_t = gram_blocked(Q, krow, P, krow, GAM, vrow, rc, K, C, BK, KB, False, PRECISION, True)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mv = cols < V
            do = _value_tile(DO, orow, ostride, on, rc, cols, mv).to(tl.float32)
            d_delta = tl.dot(A_t, do, input_precision=PRECISION)
            tl.store(DU + (vrow + rc[:, None]) * V + cols[None, :], d_delta, mask=mv[None, :])
            for k0 in range(0, BK, KB):  # a loop, not unrolled: one block of columns live at a time
                rkb = k0 + tl.arange(0, KB)
                mkb = rkb < K
                qd_t = _rows_t(Q, krow, rc, rkb, mkb, K) * tl.exp(_rows_t(GAM, vrow, rc, rkb, mkb, K))
                d_s = tl.dot(qd_t, do, input_precision=PRECISION) - tl.dot(_rows_t(W, vrow, rc, rkb, mkb, K), d_delta,
                                                                           input_precision=PRECISION)
                tl.store(DS + (srow + rkb[:, None]) * V + cols[None, :], d_s, mask=mkb[:, None] & mv[None, :])
    else:
        A_t = gram_upper(Q, krow, P, krow, GAM, vrow, rc, rk, mk, K, C, False, PRECISION)
        d_w = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mv = cols < V
            do = _value_tile(DO, orow, ostride, on, rc, cols, mv).to(tl.float32)
            d_delta = tl.dot(A_t, do, input_precision=PRECISION)
            tl.store(DU + (vrow + rc[:, None]) * V + cols[None, :], d_delta, mask=mv[None, :])
            qd_t = _rows_t(Q, krow, rc, rk, mk, K) * tl.exp(_rows_t(GAM, vrow, rc, rk, mk, K))
            d_s = tl.dot(qd_t, do, input_precision=PRECISION) - tl.dot(_rows_t(W, vrow, rc, rk, mk, K), d_delta,
                                                                       input_precision=PRECISION)
            tl.store(DS + (srow + rk[:, None]) * V + cols[None, :], d_s, mask=mk[:, None] & mv[None, :])
            if STORE_DW:
                s_t = state_tile_t(S, srow, V, rk, cols, mk, mv)
                d_w -= tl.dot(d_delta, s_t, input_precision=PRECISION)
        if STORE_DW:
            tl.store(DW + (vrow + rc[:, None]) * K + rk[None, :], d_w, mask=mk[None, :])


@triton.jit
def _out_ch_bwd_qp_kernel(Q, P, GAM, W, U, S, DELTA, DO, DQ, DP, DGAM, SCR, H, HV, G, STARTS, LENS,
                          K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          PRECISION: tl.constexpr, SCRATCH: tl.constexpr = False,
                          STREAM: tl.constexpr = 0, DOS_BF16: tl.constexpr = False, HAS_DELTA: tl.constexpr = False,
                          KB: tl.constexpr = 0):
    """As output.py's `_out_bwd_qp_kernel` (SCRATCH: dA as dAᵀ's transpose through scratch memory; HAS_DELTA: Δ
    read from DELTA). KB > 0 (stages.channel_key_blocks, opt-in): after the V loop (dA, dAᵀ only) everything else
    runs in a loop over key-column blocks of KB — dQ̂ = e^Γ ⊙ dO Sᵀ + gram_apply_lower(dA, P), dP =
    gram_apply_upper(dAᵀ, Q̂) and dΓ are separable over key columns — so [C, KB] tiles instead of [C, BK] are live
    (dO is read once more per block, from cache)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    d_q = tl.zeros([C, BK], dtype=tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dA_t = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        s = state_tile(S, srow, V, rk, cols, mk, mv)
        s_t = state_tile_t(S, srow, V, rk, cols, mk, mv)
        u = tl.load(U + (vrow + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
        do = _value_tile(DO, orow, ostride, on, rc, cols, mv).to(tl.float32)
        do_t = _value_tile_t(DO, orow, ostride, on, rc, cols, mv).to(tl.float32)
        delta = delta_rows(DELTA, u, _rows(W, vrow, rc, rk, mk, K), s, vrow, rc, cols, mv, V, HAS_DELTA, PRECISION)
        if KB == 0:
            d_q += mm(do, s_t, DOS_BF16, PRECISION)
        dA_t += tl.dot(delta, do_t, input_precision=PRECISION)
        if not SCRATCH:
            u_t = tl.load(U + (vrow + rc[None, :]) * V + cols[:, None], mask=mv[:, None], other=0.0).to(tl.float32)
            delta_t = delta_rows_t(DELTA, u_t, _rows_t(W, vrow, rc, rk, mk, K), s_t, vrow, rc, cols, mv, V, HAS_DELTA,
                                   PRECISION)
            dA += tl.dot(do, delta_t, input_precision=PRECISION)
    if SCRATCH:
        dA = transpose_via(SCR, vrow, dA_t, rc, C)
    if KB == 0:
        _qp_key_side(Q, P, GAM, DQ, DP, DGAM, d_q, dA, dA_t, krow, vrow, rc, rk, mk, K, C, BK, PRECISION)
    else:
        for k0 in range(0, BK, KB):  # a loop, not unrolled: one block of columns live at a time
            rkb = k0 + tl.arange(0, KB)
            mkb = rkb < K
            d_q_blk = tl.zeros([C, KB], dtype=tl.float32)
            for v0 in range(0, V, BV):
                cols = v0 + tl.arange(0, BV)
                mv = cols < V
                d_q_blk += mm(_value_tile(DO, orow, ostride, on, rc, cols, mv).to(tl.float32),
                              state_tile_t(S, srow, V, rkb, cols, mkb, mv), DOS_BF16, PRECISION)
            _qp_key_side(Q, P, GAM, DQ, DP, DGAM, d_q_blk, dA, dA_t, krow, vrow, rc, rkb, mkb, K, C, KB, PRECISION)


@triton.jit
def _qp_key_side(Q, P, GAM, DQ, DP, DGAM, d_q, dA, dA_t, krow, vrow, rc, rk, mk, K: tl.constexpr, C: tl.constexpr,
                 BK: tl.constexpr, PRECISION: tl.constexpr):
    """dQ̂, dP, dΓ of the output stage for the key columns ``rk`` ([C, BK] tiles), from dO Sᵀ (``d_q``, those
    columns) and dA, dAᵀ [C, C] (masked here)."""
    eg = tl.exp(_rows(GAM, vrow, rc, rk, mk, K))
    q = _rows(Q, krow, rc, rk, mk, K)
    d_gam = d_q * q * eg
    d_q = d_q * eg
    dA = tl.where(rc[:, None] >= rc[None, :], dA, 0.0)
    dA_t = tl.where(rc[:, None] <= rc[None, :], dA_t, 0.0)
    d_q_gram = gram_apply_lower(dA, P, krow, GAM, vrow, rc, rk, mk, K, C, BK, False, PRECISION)
    d_q += d_q_gram
    d_gam += q * d_q_gram
    tl.store(DQ + (vrow + rc[:, None]) * K + rk[None, :], d_q, mask=mk[None, :])
    d_p = gram_apply_upper(dA_t, Q, krow, GAM, vrow, rc, rk, mk, K, C, BK, False, PRECISION)
    d_gam -= _rows(P, krow, rc, rk, mk, K) * d_p
    tl.store(DP + (vrow + rc[:, None]) * K + rk[None, :], d_p, mask=mk[None, :])
    tl.store(DGAM + (vrow + rc[:, None]) * K + rk[None, :], d_gam, mask=mk[None, :])


def _per_value_head(t, G):
    return t.repeat_interleave(G, dim=1) if G > 1 else t


def _wy_torch(k_hat, p, v, beta, gamma):
    G = v.shape[1] // k_hat.shape[1]
    return wy_form(_per_value_head(k_hat, G), _per_value_head(p, G), v, beta, gamma)


def _output_torch(q_hat, p, gamma, W, U, S):
    G = U.shape[1] // q_hat.shape[1]
    q, pv = _per_value_head(q_hat, G), _per_value_head(p, G)
    return (q * torch.exp(gamma)) @ S + gram(q, pv, gamma, strict=False) @ (U - W @ S)


def _pick_wy_channel_forward(K: int):
    """The row kernel at 4 warps up to K = 128 (H100, Triton 3.6: 5.8 ms against 6.5 ms at 8 warps per 32K-token
    call, benchmarks/wy_forward_ab.py; 8 warps still 3% slower after session i's split Gram); the tile config's
    warps for larger keys, not measured at 4. Up to K = 128 the blocked solve of `_wy_ch_fwd_blocked_kernel` is the
    default (H100 session j: PKDA's forward 15.9 → 13.7 ms at 32K); PDELTA_WY_CHANNEL_BLOCKED=0 keeps the row kernel."""
    if os.environ.get("PDELTA_WY_CHANNEL_BLOCKED", "1") != "0" and K <= 128:
        width = wy_key_blocks()  # opt-in: the Gram and W, P̃, d over key-column blocks
        return _wy_ch_fwd_blocked_kernel, 4, ({"KB": min(next_pow2(K), width)} if width else {})
    return _wy_ch_fwd_kernel, (4 if K <= 128 else None)


wy_channel_decay = make_wy_stage("wy_channel", _wy_ch_fwd_kernel, _wy_ch_bwd_kernel, _wy_torch,
                                 decay_shape=lambda Nc, HV, K: (Nc, HV, K), pick_fwd=_pick_wy_channel_forward,
                                 dl_kernel=_wy_ch_bwd_dl_kernel, channel_decay=True)
output_channel_decay = make_output_stage("output_channel", _out_ch_fwd_kernel, _out_ch_bwd_state_kernel,
                                         _out_ch_bwd_qp_kernel, _output_torch,
                                         key_blocks=lambda BK: min(BK, output_key_blocks()))
