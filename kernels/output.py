"""Chunk outputs for a scalar decay per token (PDN, PGDN): forward and backward.

Per chunk and value head, with S the state entering the chunk and A = Q̂ Pᵀ ⊙ D (lower, diagonal included):

    Δ = U − W S ,     O = (Q̂ ⊙ e^Γ) S + A Δ

Backward (given dO): dΔ = Aᵀ dO;  dS = (Q̂ ⊙ e^Γ)ᵀ dO − Wᵀ dΔ;  dU = dΔ;  dW = −dΔ Sᵀ;
dQ̂ = (dO Sᵀ) ⊙ e^Γ + (dA ⊙ D) P;  dP = (dA ⊙ D)ᵀ Q̂ with dA = dO Δᵀ;  dΓ = rowsum(dO Sᵀ ⊙ Q̂e^Γ)
+ rowsum(dA ⊙ A) − colsum(dA ⊙ A).
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (triton.jit)
import triton.language as tl

from ..chunk.gram import gram
from .stages import make_output_stage

C = 64


@triton.jit
def value_rows(i_c64, i_h, HV, V: tl.constexpr, C: tl.constexpr, STREAM: tl.constexpr, STARTS, LENS):
    """(offset of row 0, elements between rows, rows holding tokens) of a value tensor (O, dO, V, dV) for chunk
    i_c, value head i_h: STREAM = 0, the chunk layout [Nc, HV, C, V]; else the stream layout [L, HV, V] of the op's
    own input and output, read and written in place (no relayout copies, no casts around the stages) — STREAM = 1,
    whole chunks (chunk i_c holds tokens i_c·C ..); STREAM = 2, chunk i_c starts at token STARTS[i_c] and holds
    LENS[i_c] tokens (fewer than C in a segment's last chunk: the other rows read as zeros, are never written)."""
    if STREAM == 2:
        base = (tl.load(STARTS + i_c64).to(tl.int64) * HV + i_h) * V
        stride = HV * V
        nrows = tl.load(LENS + i_c64)
    elif STREAM == 1:
        base = (i_c64 * C * HV + i_h) * V
        stride = HV * V
        nrows = C
    else:
        base = (i_c64 * HV + i_h) * C * V
        stride = V
        nrows = C
    return base, stride, nrows


@triton.jit
def _value_tile(X, base, stride, nrows, rows, cols, mv):
    """Rows ``rows`` of a value tensor (V, dO) at (base, stride, nrows) from `value_rows`, columns ``cols``
    (masked; rows past ``nrows`` read as zeros)."""
    return tl.load(X + base + rows[:, None] * stride + cols[None, :], mask=(rows < nrows)[:, None] & mv[None, :],
                   other=0.0)


@triton.jit
def _value_tile_t(X, base, stride, nrows, rows, cols, mv):
    """The same tile transposed, read straight from memory."""
    return tl.load(X + base + rows[None, :] * stride + cols[:, None], mask=mv[:, None] & (rows < nrows)[None, :],
                   other=0.0)


@triton.jit
def _store_value_tile(X, base, stride, nrows, rows, cols, mv, value):
    """Store ``value`` into rows ``rows`` of a value tensor (O, dV) at (base, stride, nrows) from `value_rows`,
    columns ``cols`` (masked; rows past ``nrows`` are padding and never written), in X's dtype."""
    tl.store(X + base + rows[:, None] * stride + cols[None, :], value, mask=(rows < nrows)[:, None] & mv[None, :])


@triton.jit
def state_tile(S, srow, V: tl.constexpr, rk, cols, mk, mv):
    """Rows ``rk``, columns ``cols`` of a chunk state S [.., K, V] (row ``srow`` first) in float32, whatever its
    storage (float32, or bfloat16 for 16-bit inputs: see state_pass.states_dtype)."""
    return tl.load(S + (srow + rk[:, None]) * V + cols[None, :], mask=mk[:, None] & mv[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def state_tile_t(S, srow, V: tl.constexpr, rk, cols, mk, mv):
    """The same tile transposed, [BV, BK], read straight from memory."""
    return tl.load(S + (srow + rk[None, :]) * V + cols[:, None], mask=mv[:, None] & mk[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def delta_rows(DELTA, u, w, s, row0, rc, cols, mv, V: tl.constexpr, HAS_DELTA: tl.constexpr,
               PRECISION: tl.constexpr):
    """Δ = U − W S for rows row0 + rc, columns ``cols`` ([C, BV] float32, from the caller's tiles ``u`` of U, ``w``
    [C, BK] of W and ``s`` [BK, BV] of S) — or read from DELTA where the forward pass kept it (HAS_DELTA, see
    state_pass.keeps_delta): the caller's loads of ``u`` and ``w`` are then dead code, which the compiler drops."""
    if HAS_DELTA:
        return tl.load(DELTA + (row0 + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
    return u - tl.dot(w, s, input_precision=PRECISION)


@triton.jit
def delta_rows_t(DELTA, u_t, w_t, s_t, row0, rc, cols, mv, V: tl.constexpr, HAS_DELTA: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The same tile transposed ([BV, C], from ``u_t``, ``w_t`` [BK, C] and ``s_t`` [BV, BK]), read straight from
    memory where kept."""
    if HAS_DELTA:
        return tl.load(DELTA + (row0 + rc[None, :]) * V + cols[:, None], mask=mv[:, None], other=0.0).to(tl.float32)
    return u_t - tl.dot(s_t, w_t, input_precision=PRECISION)


@triton.jit
def mm(a, b, BF16: tl.constexpr, PRECISION: tl.constexpr):
    """a·b with float32 accumulation; BF16 (host: _triton_utils.exact_in_bf16): both operands hold bfloat16 values
    (dO and S for 16-bit inputs), so bfloat16 operands give the exact product, as TF32 does, for less. (Rounding
    float32 operands to bfloat16 this way — PDELTA_BF16_WS, session m, W·S — hit an illegal memory access on an
    H100 with Triton 3.6, like session h's all-bf16 build: not used for inexact products.)"""
    if BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _out_fwd_kernel(Q, P, GAM, W, U, S, DELTA, O, H, HV, G, STARTS, LENS,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PRECISION: tl.constexpr, STREAM: tl.constexpr = 0, HAS_DELTA: tl.constexpr = False):
    """One program per chunk and value head: A once, then every V block (A is the costly part). HAS_DELTA: Δ is
    read from DELTA (kept by the state pass) instead of formed from U and W."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    gam = tl.load(GAM + vrow + rc)
    q = tl.load(Q + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    p_t = tl.load(P + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
    lower = rc[:, None] >= rc[None, :]
    A = tl.where(lower, tl.dot(q, p_t, input_precision=PRECISION)
                 * tl.exp(tl.where(lower, gam[:, None] - gam[None, :], 0.0)), 0.0)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        s = state_tile(S, srow, V, rk, cols, mk, mv)
        w = tl.load(W + (vrow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
        u = tl.load(U + (vrow + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
        delta = delta_rows(DELTA, u, w, s, vrow, rc, cols, mv, V, HAS_DELTA, PRECISION)
        qd = tl.load(Q + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0) * tl.exp(gam)[:, None]
        o = tl.dot(qd, s, input_precision=PRECISION) + tl.dot(A, delta, input_precision=PRECISION)
        _store_value_tile(O, orow, ostride, on, rc, cols, mv, o)


@triton.jit
def _out_bwd_state_kernel(Q, P, GAM, W, S, DO, DW, DU, DS, H, HV, G, STARTS, LENS,
                          K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          PRECISION: tl.constexpr, STREAM: tl.constexpr = 0, STORE_DW: tl.constexpr = True):
    """dΔ = Aᵀ dO (= dU), dS = (Q̂ ⊙ e^Γ)ᵀ dO − Wᵀ dΔ, dW = −Σ_V-blocks dΔ Sᵀ (accumulated here, no partials) —
    unless not STORE_DW: the state pass forms dW from dU (stages.fused_dw)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    gam = tl.load(GAM + vrow + rc)
    upper = rc[:, None] <= rc[None, :]
    pp = tl.load(P + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
    q_t = tl.load(Q + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0)
    A_t = tl.where(upper, tl.dot(pp, q_t, input_precision=PRECISION)
                   * tl.exp(tl.where(upper, gam[None, :] - gam[:, None], 0.0)), 0.0)
    d_w = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        do = _value_tile(DO, orow, ostride, on, rc, cols, mv).to(tl.float32)
        d_delta = tl.dot(A_t, do, input_precision=PRECISION)
        tl.store(DU + (vrow + rc[:, None]) * V + cols[None, :], d_delta, mask=mv[None, :])
        qd_t = tl.load(Q + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0) * tl.exp(gam)[None, :]
        w_t = tl.load(W + (vrow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
        d_s = tl.dot(qd_t, do, input_precision=PRECISION) - tl.dot(w_t, d_delta, input_precision=PRECISION)
        tl.store(DS + (srow + rk[:, None]) * V + cols[None, :], d_s, mask=mk[:, None] & mv[None, :])
        if STORE_DW:
            s_t = state_tile_t(S, srow, V, rk, cols, mk, mv)
            d_w -= tl.dot(d_delta, s_t, input_precision=PRECISION)
    if STORE_DW:
        tl.store(DW + (vrow + rc[:, None]) * K + rk[None, :], d_w, mask=mk[None, :])


@triton.jit
def transpose_via(SCR, row0, x, rc, C: tl.constexpr):
    """xᵀ of a [C, C] register tile through this program's rows of scratch memory (16 KB, cache-resident): no
    tl.trans, which miscompiles dot accumulators on Hopper (Triton 3.6)."""
    tl.debug_barrier()  # earlier readers of the scratch rows are done
    tl.store(SCR + (row0 + rc[:, None]) * C + rc[None, :], x)
    tl.debug_barrier()  # the transposed read crosses threads
    return tl.load(SCR + (row0 + rc[None, :]) * C + rc[:, None])


@triton.jit
def _out_bwd_qp_kernel(Q, P, GAM, W, U, S, DELTA, DO, DQ, DP, DGAM, SCR, H, HV, G, STARTS, LENS,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PRECISION: tl.constexpr, SCRATCH: tl.constexpr = False,
                       STREAM: tl.constexpr = 0, DOS_BF16: tl.constexpr = False, HAS_DELTA: tl.constexpr = False):
    """dQ̂, dP and dΓ: accumulates dO Sᵀ and dAᵀ = Δ dOᵀ over V blocks, and dA = dO Δᵀ too — or, with SCRATCH,
    dA and Aᵀ as transposes through scratch memory (two fewer products per V block, one fewer per chunk).
    HAS_DELTA: Δ and Δᵀ are read from DELTA (kept by the forward) instead of formed from U and W."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_c64 = i_c.to(tl.int64)
    krow = (i_c64 * H + i_h // G) * C
    vrow = (i_c64 * HV + i_h) * C
    srow = (i_c64 * HV + i_h) * K
    orow, ostride, on = value_rows(i_c64, i_h, HV, V, C, STREAM, STARTS, LENS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    gam = tl.load(GAM + vrow + rc)
    eg = tl.exp(gam)
    w = tl.load(W + (vrow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
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
        delta = delta_rows(DELTA, u, w, s, vrow, rc, cols, mv, V, HAS_DELTA, PRECISION)  # [C, BV]
        d_q += mm(do, s_t, DOS_BF16, PRECISION)
        dA_t += tl.dot(delta, do_t, input_precision=PRECISION)
        if not SCRATCH:
            u_t = tl.load(U + (vrow + rc[None, :]) * V + cols[:, None], mask=mv[:, None], other=0.0).to(tl.float32)
            w_t = tl.load(W + (vrow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
            delta_t = delta_rows_t(DELTA, u_t, w_t, s_t, vrow, rc, cols, mv, V, HAS_DELTA, PRECISION)  # [BV, C]
            dA += tl.dot(do, delta_t, input_precision=PRECISION)
    if SCRATCH:
        dA = transpose_via(SCR, vrow, dA_t, rc, C)
    q = tl.load(Q + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0)
    d_gam = tl.sum(d_q * q, axis=1) * eg  # from (Q̂ ⊙ e^Γ) S
    d_q = d_q * eg[:, None]
    lower = rc[:, None] >= rc[None, :]
    upper = rc[:, None] <= rc[None, :]
    decay = tl.exp(tl.where(lower, gam[:, None] - gam[None, :], 0.0))
    decay_t = tl.exp(tl.where(upper, gam[None, :] - gam[:, None], 0.0))
    p_t = tl.load(P + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
    A = tl.where(lower, tl.dot(q, p_t, input_precision=PRECISION) * decay, 0.0)
    dA = tl.where(lower, dA, 0.0)
    pp = tl.load(P + (krow + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
    d_q += tl.dot(dA * decay, pp, input_precision=PRECISION)
    tl.store(DQ + (vrow + rc[:, None]) * K + rk[None, :], d_q, mask=mk[None, :])
    if SCRATCH:
        A_t = transpose_via(SCR, vrow, A, rc, C)
    else:
        q_t = tl.load(Q + (krow + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0)
        A_t = tl.where(upper, tl.dot(pp, q_t, input_precision=PRECISION) * decay_t, 0.0)
    dA_t = tl.where(upper, dA_t, 0.0)
    d_p = tl.dot(dA_t * decay_t, q, input_precision=PRECISION)
    tl.store(DP + (vrow + rc[:, None]) * K + rk[None, :], d_p, mask=mk[None, :])
    d_gam += tl.sum(dA * A, axis=1) - tl.sum(dA_t * A_t, axis=1)
    tl.store(DGAM + vrow + rc, d_gam)


def _output_torch(q_hat, p, gamma, W, U, S):
    """The stage in PyTorch: O = (Q̂ ⊙ e^Γ) S + gram(Q̂, P, Γ) (U − W S)."""
    G = U.shape[1] // q_hat.shape[1]
    q, pv = (t.repeat_interleave(G, dim=1) if G > 1 else t for t in (q_hat, p))
    g = gamma[..., None]
    return (q * torch.exp(g)) @ S + gram(q, pv, g, strict=False) @ (U - W @ S)


output_scalar_decay = make_output_stage("output", _out_fwd_kernel, _out_bwd_state_kernel, _out_bwd_qp_kernel,
                                        _output_torch)
