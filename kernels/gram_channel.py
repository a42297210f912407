"""Decay-weighted Gram matrices with a per-channel decay inside a 64-token chunk, and their backward.

    X_ij = Σ_d a_id b_jd e^{Γ_id − Γ_jd}      for i > j (strict) or i ≥ j, else 0

Γ (cumulative log-decay, [C, K]) is non-increasing in the row index, so every exponential below is of a
non-positive number: off-diagonal 16-row blocks split e^{Γ_i − Γ_j} at the last row before the block (two
factors ≤ 1, one tensor-core product per block), and the diagonal 16×16 blocks are built exactly, one column
per block at a time. Nothing overflows, whatever the decay (pdelta_cp.chunk.gram is the PyTorch twin).
All operands are read from memory with row offsets (a, b: key-head rows; Γ: value-head rows).

The diagonal blocks have a fast path: when every Γ_id lies within DIAG_REACH of its block's reference row
(Γ at the block's row 8), e^{Γ_id − Γ_jd} = e^{Γ_id − ref_d} e^{ref_d − Γ_jd} with both factors inside fp32's
range, and all four blocks come from one tensor-core product (tf32x3: fp32-grade, like the exact loop). One
range check per program picks it; stronger decays take the exact column loop.
"""
from __future__ import annotations

import os

import triton  # noqa: F401  (triton.jit)
import triton.language as tl

# |Γ_id − ref_d| bound of the diagonal blocks' fast path: factors within e^±30 (fp32 reaches e^±87, and the
# masked-out upper entries e^60 times the operands stay finite). PDELTA_GRAM_SPLIT=0 (read at import) keeps
# the exact loop everywhere, for A/B runs and bisecting.
DIAG_REACH = tl.constexpr(30.0 if os.environ.get("PDELTA_GRAM_SPLIT", "1") != "0" else -1.0)

@triton.jit
def _rows(X, row0, rows, rk, mk, K: tl.constexpr):
    """[len(rows), len(rk)] tile of rows row0 + rows of a [*, K] tensor (columns rk, masked by mk), in float32
    whatever the storage (W is bfloat16 where backward remakes it so: stages.remade_wy_dtype)."""
    return tl.load(X + (row0 + rows[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)


@triton.jit
def _rows_t(X, row0, rows, rk, mk, K: tl.constexpr):
    """The same tile transposed, read straight from memory (no transpose of a register tile)."""
    return tl.load(X + (row0 + rows[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)


@triton.jit
def _block_row(G, g_row, rc, rk, mk, K: tl.constexpr, OFFSET: tl.constexpr):
    """[C, BK]: row i holds Γ at row OFFSET of i's 16-row block (clamped to row 0): a reference for split factors
    (OFFSET 8: the diagonal blocks'; −1 and 15: the strips before and after a block)."""
    return _rows(G, g_row, tl.maximum((rc // 16) * 16 + OFFSET, 0), rk, mk, K)


@triton.jit
def _block_row_t(G, g_row, rc, rk, mk, K: tl.constexpr, OFFSET: tl.constexpr):
    return _rows_t(G, g_row, tl.maximum((rc // 16) * 16 + OFFSET, 0), rk, mk, K)


@triton.jit
def _fits_split(g, ref, EXACT_DIAG: tl.constexpr):
    """True when the diagonal blocks may use the split factors (scalar, checked once per program)."""
    if EXACT_DIAG:
        return False
    return tl.max(tl.max(tl.abs(g - ref), axis=1), axis=0) <= DIAG_REACH


@triton.jit
def _dot_fp32(x, y, PRECISION: tl.constexpr):
    """A product as accurate as fp32 CUDA-core sums: tf32x3 on the GPU, exact in the interpreter."""
    if PRECISION == "ieee":
        return tl.dot(x, y, input_precision="ieee")
    return tl.dot(x, y, input_precision="tf32x3")


@triton.jit
def gram_lower(A, a_row, B, b_row, G, g_row, rc, rk, mk, K: tl.constexpr, C: tl.constexpr,
               STRICT: tl.constexpr, PRECISION: tl.constexpr, EXACT_DIAG: tl.constexpr = False):
    """X [C, C] (lower part) from rows of A and B and their shared cumulative decay G."""
    a = _rows(A, a_row, rc, rk, mk, K)
    ga = _rows(G, g_row, rc, rk, mk, K)
    out = tl.zeros([C, C], dtype=tl.float32)
    # every strip's row factor e^{Γ_i − Γ_(row before i's block)} in one tile (block 0's rows are masked out)
    left = a * tl.exp(ga - _block_row(G, g_row, rc, rk, mk, K, -1))
    for blk in tl.static_range(1, C // 16):
        r0 = blk * 16
        ref = tl.load(G + (g_row + r0 - 1) * K + rk, mask=mk, other=0.0)
        in_blk = (rc >= r0) & (rc < r0 + 16)
        before = rc < r0
        right_t = _rows_t(B, b_row, rc, rk, mk, K) * tl.exp(
            tl.where(before[None, :], ref[:, None] - _rows_t(G, g_row, rc, rk, mk, K), 0.0))
        out += tl.where(in_blk[:, None] & before[None, :], tl.dot(left, right_t, input_precision=PRECISION), 0.0)
    ref = _block_row(G, g_row, rc, rk, mk, K, 8)
    if _fits_split(ga, ref, EXACT_DIAG):
        right_t = _rows_t(B, b_row, rc, rk, mk, K) * tl.exp(_block_row_t(G, g_row, rc, rk, mk, K, 8)
                                                            - _rows_t(G, g_row, rc, rk, mk, K))
        diag = _dot_fp32(a * tl.exp(ga - ref), right_t, PRECISION)
        if STRICT:
            keep = rc[:, None] > rc[None, :]
        else:
            keep = rc[:, None] >= rc[None, :]
        out = tl.where(keep & (rc[:, None] // 16 == rc[None, :] // 16), diag, out)
    else:
        for jj in range(16):
            jrow = (rc // 16) * 16 + jj
            if STRICT:
                ok = rc > jrow
            else:
                ok = rc >= jrow
            bj = _rows(B, b_row, jrow, rk, mk, K)
            gj = _rows(G, g_row, jrow, rk, mk, K)
            val = tl.sum(a * bj * tl.exp(tl.where(ok[:, None], ga - gj, 0.0)), axis=1)
            out = tl.where((rc[None, :] == jrow[:, None]) & ok[:, None], val[:, None], out)
    return out


@triton.jit
def gram_blocked(A, a_row, B, b_row, G, g_row, rc, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 KB: tl.constexpr, STRICT: tl.constexpr, PRECISION: tl.constexpr, UPPER: tl.constexpr):
    """`gram_lower` (or, UPPER, `gram_upper`) summed over key-column blocks of KB (a loop, not unrolled: [C, KB]
    tiles live at a time)."""
    out = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, BK, KB):
        rk = k0 + tl.arange(0, KB)
        if UPPER:
            out += gram_upper(A, a_row, B, b_row, G, g_row, rc, rk, rk < K, K, C, STRICT, PRECISION)
        else:
            out += gram_lower(A, a_row, B, b_row, G, g_row, rc, rk, rk < K, K, C, STRICT, PRECISION)
    return out


@triton.jit
def gram_upper(A, a_row, B, b_row, G, g_row, rc, rk, mk, K: tl.constexpr, C: tl.constexpr,
               STRICT: tl.constexpr, PRECISION: tl.constexpr, EXACT_DIAG: tl.constexpr = False):
    """Xᵀ [C, C] (upper part) of X = gram_lower(A, B): Xᵀ_ji = Σ_d b_jd a_id e^{Γ_id − Γ_jd} for i ≥ j (or >)."""
    b = _rows(B, b_row, rc, rk, mk, K)
    gb = _rows(G, g_row, rc, rk, mk, K)
    out = tl.zeros([C, C], dtype=tl.float32)
    # every strip's row factor e^{Γ_(last row of j's block) − Γ_j} in one tile (the last block's rows are masked out)
    left = b * tl.exp(_block_row(G, g_row, rc, rk, mk, K, 15) - gb)
    for blk in tl.static_range(0, C // 16 - 1):
        r1 = blk * 16 + 16
        ref = tl.load(G + (g_row + r1 - 1) * K + rk, mask=mk, other=0.0)
        in_blk = (rc >= r1 - 16) & (rc < r1)
        after = rc >= r1
        right_t = _rows_t(A, a_row, rc, rk, mk, K) * tl.exp(
            tl.where(after[None, :], _rows_t(G, g_row, rc, rk, mk, K) - ref[:, None], 0.0))
        out += tl.where(in_blk[:, None] & after[None, :], tl.dot(left, right_t, input_precision=PRECISION), 0.0)
    ref = _block_row(G, g_row, rc, rk, mk, K, 8)
    if _fits_split(gb, ref, EXACT_DIAG):
        right_t = _rows_t(A, a_row, rc, rk, mk, K) * tl.exp(_rows_t(G, g_row, rc, rk, mk, K)
                                                            - _block_row_t(G, g_row, rc, rk, mk, K, 8))
        diag = _dot_fp32(b * tl.exp(ref - gb), right_t, PRECISION)
        if STRICT:
            keep = rc[None, :] > rc[:, None]
        else:
            keep = rc[None, :] >= rc[:, None]
        out = tl.where(keep & (rc[:, None] // 16 == rc[None, :] // 16), diag, out)
    else:
        for ii in range(16):
            irow = (rc // 16) * 16 + ii
            if STRICT:
                ok = irow > rc
            else:
                ok = irow >= rc
            ai = _rows(A, a_row, irow, rk, mk, K)
            gi = _rows(G, g_row, irow, rk, mk, K)
            val = tl.sum(b * ai * tl.exp(tl.where(ok[:, None], gi - gb, 0.0)), axis=1)
            out = tl.where((rc[None, :] == irow[:, None]) & ok[:, None], val[:, None], out)
    return out


@triton.jit
def gram_apply_lower(dX, B, b_row, G, g_row, rc, rk, mk, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     STRICT: tl.constexpr, PRECISION: tl.constexpr, EXACT_DIAG: tl.constexpr = False):
    """dA [C, BK]: dA_id = Σ_j dX_ij b_jd e^{Γ_id − Γ_jd} over the lower region (dX already masked)."""
    ga = _rows(G, g_row, rc, rk, mk, K)
    out = tl.zeros([C, BK], dtype=tl.float32)
    for blk in tl.static_range(1, C // 16):
        r0 = blk * 16
        ref = tl.load(G + (g_row + r0 - 1) * K + rk, mask=mk, other=0.0)
        in_blk = (rc >= r0) & (rc < r0 + 16)
        before = rc < r0
        right = _rows(B, b_row, rc, rk, mk, K) * tl.exp(
            tl.where(before[:, None], ref[None, :] - _rows(G, g_row, rc, rk, mk, K), 0.0))
        out += tl.dot(tl.where(in_blk[:, None] & before[None, :], dX, 0.0), right, input_precision=PRECISION)
    # each strip's rows times e^{Γ_i − Γ_(row before i's block)}, once for all strips (block 0's rows are zero)
    out = out * tl.exp(ga - _block_row(G, g_row, rc, rk, mk, K, -1))
    ref = _block_row(G, g_row, rc, rk, mk, K, 8)
    if _fits_split(ga, ref, EXACT_DIAG):
        if STRICT:
            keep = rc[:, None] > rc[None, :]
        else:
            keep = rc[:, None] >= rc[None, :]
        dX_diag = tl.where(keep & (rc[:, None] // 16 == rc[None, :] // 16), dX, 0.0)
        out += _dot_fp32(dX_diag, _rows(B, b_row, rc, rk, mk, K) * tl.exp(ref - ga), PRECISION) * tl.exp(ga - ref)
    else:
        for jj in range(16):
            jrow = (rc // 16) * 16 + jj
            if STRICT:
                ok = rc > jrow
            else:
                ok = rc >= jrow
            dxv = tl.sum(tl.where((rc[None, :] == jrow[:, None]) & ok[:, None], dX, 0.0), axis=1)
            bj = _rows(B, b_row, jrow, rk, mk, K)
            gj = _rows(G, g_row, jrow, rk, mk, K)
            out += dxv[:, None] * bj * tl.exp(tl.where(ok[:, None], ga - gj, 0.0))
    return out


@triton.jit
def gram_apply_upper(dXt, A, a_row, G, g_row, rc, rk, mk, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     STRICT: tl.constexpr, PRECISION: tl.constexpr, EXACT_DIAG: tl.constexpr = False):
    """dB [C, BK]: dB_jd = Σ_i dX_ij a_id e^{Γ_id − Γ_jd}, from dXᵀ (upper region, already masked)."""
    gb = _rows(G, g_row, rc, rk, mk, K)
    out = tl.zeros([C, BK], dtype=tl.float32)
    for blk in tl.static_range(0, C // 16 - 1):
        r1 = blk * 16 + 16
        ref = tl.load(G + (g_row + r1 - 1) * K + rk, mask=mk, other=0.0)
        in_blk = (rc >= r1 - 16) & (rc < r1)
        after = rc >= r1
        right = _rows(A, a_row, rc, rk, mk, K) * tl.exp(
            tl.where(after[:, None], _rows(G, g_row, rc, rk, mk, K) - ref[None, :], 0.0))
        out += tl.dot(tl.where(in_blk[:, None] & after[None, :], dXt, 0.0), right, input_precision=PRECISION)
    # each strip's rows times e^{Γ_(last row of j's block) − Γ_j}, once for all strips (the last block's rows are zero)
    out = out * tl.exp(_block_row(G, g_row, rc, rk, mk, K, 15) - gb)
    ref = _block_row(G, g_row, rc, rk, mk, K, 8)
    if _fits_split(gb, ref, EXACT_DIAG):
        if STRICT:
            keep = rc[None, :] > rc[:, None]
        else:
            keep = rc[None, :] >= rc[:, None]
        dXt_diag = tl.where(keep & (rc[:, None] // 16 == rc[None, :] // 16), dXt, 0.0)
        out += _dot_fp32(dXt_diag, _rows(A, a_row, rc, rk, mk, K) * tl.exp(gb - ref), PRECISION) * tl.exp(ref - gb)
    else:
        for ii in range(16):
            irow = (rc // 16) * 16 + ii
            if STRICT:
                ok = irow > rc
            else:
                ok = irow >= rc
            dxv = tl.sum(tl.where((rc[None, :] == irow[:, None]) & ok[:, None], dXt, 0.0), axis=1)
            ai = _rows(A, a_row, irow, rk, mk, K)
            gi = _rows(G, g_row, irow, rk, mk, K)
            out += dxv[:, None] * ai * tl.exp(tl.where(ok[:, None], gi - gb, 0.0))
    return out


@triton.jit
def _gram_test_kernel(A, B, G, X, XT, DX, DA, DB, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      STRICT: tl.constexpr, PRECISION: tl.constexpr, EXACT_DIAG: tl.constexpr):
    """Test harness: one chunk per program; exposes the four helpers to the unit test."""
    i = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    mk = rk < K
    row = i * C
    x = gram_lower(A, row, B, row, G, row, rc, rk, mk, K, C, STRICT, PRECISION, EXACT_DIAG)
    tl.store(X + (row + rc[:, None]) * C + rc[None, :], x)
    xt = gram_upper(A, row, B, row, G, row, rc, rk, mk, K, C, STRICT, PRECISION, EXACT_DIAG)
    tl.store(XT + (row + rc[:, None]) * C + rc[None, :], xt)
    dx = tl.load(DX + (row + rc[:, None]) * C + rc[None, :])
    if STRICT:
        low = rc[:, None] > rc[None, :]
    else:
        low = rc[:, None] >= rc[None, :]
    dx = tl.where(low, dx, 0.0)
    dxt = tl.load(DX + (row + rc[None, :]) * C + rc[:, None])
    if STRICT:
        up = rc[:, None] < rc[None, :]
    else:
        up = rc[:, None] <= rc[None, :]
    dxt = tl.where(up, dxt, 0.0)
    da = gram_apply_lower(dx, B, row, G, row, rc, rk, mk, K, C, BK, STRICT, PRECISION, EXACT_DIAG)
    tl.store(DA + (row + rc[:, None]) * K + rk[None, :], da, mask=mk[None, :])
    db = gram_apply_upper(dxt, A, row, G, row, rc, rk, mk, K, C, BK, STRICT, PRECISION, EXACT_DIAG)
    tl.store(DB + (row + rc[:, None]) * K + rk[None, :], db, mask=mk[None, :])


def run_gram_test(a, b, gamma, dX, strict: bool, exact_diag: bool = False):
    """a, b, gamma [N, C, K]; dX [N, C, C] -> (X, Xᵀ, dA, dB) computed by the helpers (float32).
    ``exact_diag`` forces the diagonal blocks' exact loop (otherwise a range check picks the split product)."""
    import torch

    from ._triton_utils import dot_precision, next_pow2

    N, C, K = a.shape
    X, XT = a.new_empty(N, C, C), a.new_empty(N, C, C)
    dA, dB = torch.empty_like(a), torch.empty_like(b)
    _gram_test_kernel[(N,)](a, b, gamma, X, XT, dX, dA, dB, K=K, C=C, BK=max(16, next_pow2(K)), STRICT=strict,
                            PRECISION=dot_precision(), EXACT_DIAG=exact_diag, num_warps=4, num_stages=1)
    return X, XT, dA, dB


__all__ = ["gram_lower", "gram_upper", "gram_apply_lower", "gram_apply_upper", "run_gram_test"]
