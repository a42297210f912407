"""The inter-chunk state pass, its reverse (gradient) pass, and segment parallelism inside one GPU.

Per chunk c (state entering it S_c, [K, V] per value head), from the chunk quantities of
:mod:`pdelta_cp.chunk.delta` (W, U, P̃ = p ⊙ e^{Γ_C-Γ}, decay d = e^{Γ_C}):

    Δ_c = U_c − W_c S_c ,    S_{c+1} = d_c ⊙ S_c + P̃_cᵀ Δ_c

Forward kernel: one program per (V block, value head, segment), sequential over the segment's chunks.
In *summary mode* the same loop runs on the augmented state [M | b] (K + V columns) started from [I | 0] with
no input on the M columns: it yields the segment's affine map, which is what lets long segments be cut into
sub-segments that run in parallel and are joined by a short fold (the same summaries CP exchanges).

Reverse kernel (adjoint Λ_c = dL/dS_c, carried transposed as X = Λᵀ so no dot result is ever transposed):

    dΔ_c = P̃_c Λ_{c+1},  dP̃_c = Δ_c Λ_{c+1}ᵀ,  dd_c = Σ_v S_c ⊙ Λ_{c+1},  dU_c = dΔ_c,  dW_c = −dΔ_c S_cᵀ
    Λ_c = G_c + d_c ⊙ Λ_{c+1} − W_cᵀ dΔ_c                       (G_c: gradient arriving on S_c itself)
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..indices import index_tensor, put_rows, take_rows
from .output import delta_rows
from ._triton_utils import INTERPRET, launch_config, launch_or_fallback, next_pow2, num_sms, warn_fallback
from .stages import (GradHandoff, Recompute, add_left, arm, grad_buffer, left_dW, load_wy, save_states, save_wy,
                     take_one, torch_form_grads, u_again)


@triton.jit
def _state_fwd_kernel(W, U, P, D, S0, FIRST, LENGTH, STARTS, FINAL, DELTA, HV,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SUMMARY: tl.constexpr, STORE_STARTS: tl.constexpr, PRECISION: tl.constexpr,
                      STORE_DELTA: tl.constexpr = False):
    """STORE_DELTA (not in summary mode): DELTA [Nc, HV, C, V] receives every chunk's Δ = U − W S, which the
    output stage and the chunk-gradient kernel then read instead of forming W S again (see :func:`keeps_delta`)."""
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(FIRST + i_s).to(tl.int64)
    n = tl.load(LENGTH + i_s)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    if SUMMARY:  # columns [0, K): M (starts as I, no input); [K, K+V): b (starts at 0, input U)
        NCOL: tl.constexpr = K + V
        mcol = cols < NCOL
        ucol = cols - K
        umask = (cols >= K) & mcol
        S = tl.where((rk[:, None] == cols[None, :]) & mk[:, None], 1.0, 0.0).to(tl.float32)
    else:
        NCOL: tl.constexpr = V
        mcol = cols < V
        ucol = cols
        umask = mcol
        S = tl.load(S0 + ((i_s * HV + i_h) * K + rk[:, None]) * V + cols[None, :],
                    mask=mk[:, None] & mcol[None, :], other=0.0).to(tl.float32)
    smask = mk[:, None] & mcol[None, :]
    for j in range(n):
        base = (first + j) * HV + i_h
        if STORE_STARTS:
            tl.store(STARTS + (base * K + rk[:, None]) * NCOL + cols[None, :], S, mask=smask)
        w = tl.load(W + (base * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
        u = tl.load(U + (base * C + rc[:, None]) * V + ucol[None, :], mask=umask[None, :], other=0.0).to(tl.float32)
        p_t = tl.load(P + (base * C + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
        d = tl.load(D + base * K + rk, mask=mk, other=0.0)
        delta = u - tl.dot(w, S, input_precision=PRECISION)  # [C, BV]
        if STORE_DELTA:
            tl.store(DELTA + (base * C + rc[:, None]) * V + cols[None, :], delta, mask=mcol[None, :])
        S = d[:, None] * S + tl.dot(p_t, delta, input_precision=PRECISION)
    tl.store(FINAL + ((i_s * HV + i_h) * K + rk[:, None]) * NCOL + cols[None, :], S, mask=smask)


@triton.jit
def _state_bwd_kernel(W, U, P, D, STARTS, G, TERMINAL, FIRST, LENGTH,
                      DW, DU, DP, DD, DS0, LAM, HV, NCH,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      STORE_GRADS: tl.constexpr, STORE_LAM: tl.constexpr, PRECISION: tl.constexpr):
    """DW, DP [NV, Nc, HV, C, K] and DD [NV, Nc, HV, K] receive per-V-block partial sums (slot i_v).
    STORE_LAM (with STORE_GRADS off): LAM [Nc, HV, K, V] receives Λ_{c+1}, the adjoint leaving every chunk, for
    :func:`_state_grads_kernel` — the sequential loop then does only what the recurrence needs."""
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(FIRST + i_s).to(tl.int64)
    n = tl.load(LENGTH + i_s)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = cols < V
    tmask = mv[:, None] & mk[None, :]
    slot = i_v.to(tl.int64) * NCH
    X = tl.load(TERMINAL + ((i_s * HV + i_h) * K + rk[None, :]) * V + cols[:, None], mask=tmask, other=0.0)
    for jj in range(n):
        base = (first + n - 1 - jj) * HV + i_h
        w = tl.load(W + (base * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
        p_t = tl.load(P + (base * C + rc[None, :]) * K + rk[:, None], mask=mk[:, None], other=0.0).to(tl.float32)
        d = tl.load(D + base * K + rk, mask=mk, other=0.0)
        g_t = tl.load(G + (base * K + rk[None, :]) * V + cols[:, None], mask=tmask, other=0.0).to(tl.float32)
        d_delta_t = tl.dot(X, p_t, input_precision=PRECISION)  # [BV, C] = (P̃ Λ)ᵀ
        if STORE_LAM:
            tl.store(LAM + (base * K + rk[None, :]) * V + cols[:, None], X, mask=tmask)
        if STORE_GRADS:
            s = tl.load(STARTS + (base * K + rk[:, None]) * V + cols[None, :], mask=mk[:, None] & mv[None, :],
                        other=0.0).to(tl.float32)
            s_t = tl.load(STARTS + (base * K + rk[None, :]) * V + cols[:, None], mask=tmask, other=0.0).to(tl.float32)
            u = tl.load(U + (base * C + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
            delta = u - tl.dot(w, s, input_precision=PRECISION)  # [C, BV]
            d_p = tl.dot(delta, X, input_precision=PRECISION)  # [C, BK]
            d_w_t = -tl.dot(s, d_delta_t, input_precision=PRECISION)  # [BK, C]
            tl.store(DP + slot * C * K + (base * C + rc[:, None]) * K + rk[None, :], d_p, mask=mk[None, :])
            tl.store(DW + slot * C * K + (base * C + rc[None, :]) * K + rk[:, None], d_w_t, mask=mk[:, None])
            tl.store(DD + slot * K + base * K + rk, tl.sum(s_t * X, axis=0), mask=mk)
            tl.store(DU + (base * C + rc[None, :]) * V + cols[:, None], d_delta_t, mask=mv[:, None])
        X = g_t + X * d[None, :] - tl.dot(d_delta_t, w, input_precision=PRECISION)
    tl.store(DS0 + ((i_s * HV + i_h) * K + rk[None, :]) * V + cols[:, None], X, mask=tmask)


@triton.jit
def _state_grads_kernel(W, U, P, STARTS, LAM, DW, DU, DP, DD, DELTA, HV,
                        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, HAS_DELTA: tl.constexpr = False,
                        DW_FROM_SUM: tl.constexpr = False):
    """Per (chunk, value head), all of V in a loop of BV-wide tiles, from S_c (STARTS) and Λ_{c+1} (LAM):
    dU = P̃ Λ, dW = −dU Sᵀ, dP̃ = (U − W S) Λᵀ, dd = Σ_v S ⊙ Λ — complete sums, no per-V-block copies.
    ACCUMULATE: dW and dU are added to what DW and DU hold (the output stage's, see stages.GradHandoff).
    HAS_DELTA: U − W S is read from DELTA (kept by the forward pass), and W, U are not read at all.
    DW_FROM_SUM (with ACCUMULATE): the output stage left dU alone (no dW, see stages.fused_dw): dW = −(its dU + this
    pass's) Sᵀ in one product — both terms multiply the same S_c."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    base = i_c.to(tl.int64) * HV + i_h
    rk = tl.arange(0, BK)
    rc = tl.arange(0, C)
    mk = rk < K
    w = tl.load(W + (base * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)  # [C, BK]
    p = tl.load(P + (base * C + rc[:, None]) * K + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)  # [C, BK]
    d_w = tl.zeros((C, BK), dtype=tl.float32)
    d_p = tl.zeros((C, BK), dtype=tl.float32)
    d_d = tl.zeros((BK,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mv = cols < V
        kv = (base * K + rk[:, None]) * V + cols[None, :]  # [BK, BV] tile of a [K, V] matrix
        vk = (base * K + rk[None, :]) * V + cols[:, None]  # the same tile read transposed, [BV, BK]
        m_kv = mk[:, None] & mv[None, :]
        m_vk = mv[:, None] & mk[None, :]
        s = tl.load(STARTS + kv, mask=m_kv, other=0.0).to(tl.float32)  # float32 or bfloat16 storage
        lam = tl.load(LAM + kv, mask=m_kv, other=0.0).to(tl.float32)  # float32 or bfloat16 storage
        u = tl.load(U + (base * C + rc[:, None]) * V + cols[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
        d_u = tl.dot(p, lam, input_precision=PRECISION)  # [C, BV]
        du_at = DU + (base * C + rc[:, None]) * V + cols[None, :]
        if ACCUMULATE:
            d_u_sum = d_u + tl.load(du_at, mask=mv[None, :], other=0.0)
            tl.store(du_at, d_u_sum, mask=mv[None, :])
            if DW_FROM_SUM:
                d_u = d_u_sum
        else:
            tl.store(du_at, d_u, mask=mv[None, :])
        delta = delta_rows(DELTA, u, w, s, base * C, rc, cols, mv, V, HAS_DELTA, PRECISION)  # [C, BV]
        d_p += tl.dot(delta, tl.load(LAM + vk, mask=m_vk, other=0.0).to(tl.float32), input_precision=PRECISION)
        d_w -= tl.dot(d_u, tl.load(STARTS + vk, mask=m_vk, other=0.0).to(tl.float32), input_precision=PRECISION)
        d_d += tl.sum(s * lam, axis=1)
    dw_at = DW + (base * C + rc[:, None]) * K + rk[None, :]
    if ACCUMULATE and not DW_FROM_SUM:
        d_w += tl.load(dw_at, mask=mk[None, :], other=0.0)
    tl.store(dw_at, d_w, mask=mk[None, :])
    tl.store(DP + (base * C + rc[:, None]) * K + rk[None, :], d_p, mask=mk[None, :])
    tl.store(DD + base * K + rk, d_d, mask=mk)


def split_backward_enabled(K: int) -> bool:
    """The reverse pass stores the adjoints and a parallel kernel forms dW, dU, dP̃, dd from them (K <= 128: two
    [C, K] float32 accumulators per program). Default since its H200 check (2026-11-27: GPU tests pass, PGDN
    fwd+bwd 4% faster, less memory than per-V-block partials); PDELTA_STATE_BWD_SPLIT=0 restores the partials."""
    return os.environ.get("PDELTA_STATE_BWD_SPLIT", "1") != "0" and K <= 128


def _config(K: int, ncol: int, narrow: bool = False, pass_stages: bool = False) -> tuple[int, int, int, int]:
    """(BK, BV, num_warps, num_stages): whole K per program; V tiled to bound registers and shared memory.

    ``narrow`` is the retry after a shared-memory overflow (K = 256 on Hopper): the thinnest V tile.
    ``pass_stages``: the sequential passes (forward, not summary; reverse) prefetch the next chunk's tiles (2
    stages) up to K = 128 too — H100 session m, one pass per sequence: PGDN fwd+bwd −4.7% at 32K, −4.3% at 128K.
    """
    BK = max(16, next_pow2(K))
    BV = 16 if narrow else min(64 if BK <= 64 else 32, max(16, next_pow2(ncol)))
    forced = os.environ.get("PDELTA_STATE_BV")  # tuning switch for GPU A/B runs (16, 32 or 64 columns)
    if forced is not None and not narrow:
        if forced not in ("16", "32", "64"):
            raise ValueError(f"PDELTA_STATE_BV must be one of 16, 32, 64, got {forced!r}")
        BV = int(forced)
    return BK, BV, 4 if BK <= 64 else 8, 2 if BK <= 64 or (pass_stages and BK <= 128) else 1


def _with_narrow_retry(launch):
    """Run ``launch(narrow)``; after a Triton OutOfResources, once more with the thinnest V tile.

    Returns the launch's result, or None when even that does not fit (the caller then uses PyTorch).
    """
    from triton.runtime.errors import OutOfResources

    for narrow in (False, True):
        try:
            return launch(narrow)
        except OutOfResources as exc:
            error = exc
    warn_fallback("state_pass", error)
    return None


def _precision(summary: bool) -> str:
    if INTERPRET:
        return "ieee"
    # long products of transition maps need more than TF32 (the summary's b columns too: taking them at TF32 by a
    # per-column-block branch was correct but 7.7% slower on an H100, session l)
    return "tf32x3" if summary else "tf32"


def _segments_tensor(values, device) -> Tensor:
    return index_tensor(values, device, torch.int32)


def forward_warps(K: int, config_warps: int) -> int:
    """num_warps of the forward pass: 4 up to K = 128 (H100, Triton 3.6, benchmarks/warps_sweep.py: PGDN fwd+bwd at
    32K tokens 27.3 -> 25.9 ms against 8 warps, PKDA 63.6 -> 61.6 ms; outputs identical); larger keys keep the
    tile config's (not measured at 4)."""
    return 4 if K <= 128 else config_warps


def states_dtype(handoff: GradHandoff | None, input_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Storage dtype of the chunk-entering states S [Nc, HV, K, V] (written by the pass, read by the output stage
    and by backward): bfloat16 for 16-bit inputs (as fla keeps h in the inputs' dtype), float32 for float32 ones.

    bfloat16 halves the largest per-chunk tensor (1 KB per token and head at K = V = 128: −5% of PGDN's fwd+bwd
    peak, H200 session l, time within 1%, GPU test errors unchanged to two digits); the pass itself carries S in
    float32, only what the other kernels read is rounded. Only where the gradient for S reaches the pass in
    float32 — through ``handoff``'s "states" slot — or where there is no backward. PDELTA_STATES_BF16=1 forces
    bfloat16 (tests with float32 inputs), =0 float32.
    """
    if handoff is None and torch.is_grad_enabled():
        return torch.float32
    forced = os.environ.get("PDELTA_STATES_BF16")
    half = input_dtype in (torch.bfloat16, torch.float16) if forced is None else forced == "1"
    return torch.bfloat16 if half else torch.float32


def keeps_delta(recompute: Recompute | None) -> bool:
    """Whether the forward pass keeps every chunk's Δ = U − W S [Nc, HV, C, V] (in the states' storage dtype) for
    the output stage (forward and dQ̂/dP backward) and the chunk-gradient kernel, which then read it instead of
    forming W S again from W, U and S (fla keeps its v_new so): three [C, K]×[K, V] products and the W, U reads
    of those kernels go, for one [C, V] tensor kept from forward to backward (half of S's size). H100 session o:
    PGDN fwd+bwd −9.2% at 32K (PKDA −5.3%), peak +0.125 GiB; float32 inputs bitwise unchanged, bf16 ones within
    tests/test_gpu.py's limits (o 2.44e-3 → 2.75e-3 at 16K). Not where the states are remade in backward
    (PDELTA_RECOMPUTE_STATES=1). Default since session o; PDELTA_KEEP_DELTA=0 forms W S again."""
    states_remade = recompute is not None and recompute.states is not None
    return os.environ.get("PDELTA_KEEP_DELTA", "1") == "1" and not states_remade


def state_forward(W, U, P, D, S0, first, length, summary=False, store_starts=True, narrow=False,
                  starts_dtype: torch.dtype = torch.float32, delta_dtype: torch.dtype | None = None):
    """Launch the forward pass over segments (chunk ranges ``first``/``length``); see module docstring.
    ``starts_dtype``: storage of the states entering every chunk (see :func:`states_dtype`); ``delta_dtype``
    (not in summary mode): also keep every chunk's Δ = U − W S in that dtype (see :func:`keeps_delta`).
    Returns (starts, final, Δ or None)."""
    Nc, HV, C, K = W.shape
    V = U.shape[-1]
    ncol = K + V if summary else V
    BK, BV, warps, stages = _config(K, ncol, narrow, pass_stages=not summary)
    nseg = len(first)
    starts = W.new_empty((Nc, HV, K, ncol) if store_starts else (1,), dtype=starts_dtype)
    final = W.new_empty((nseg, HV, K, ncol), dtype=torch.float32)
    store_delta = delta_dtype is not None and not summary
    delta = W.new_empty((Nc, HV, C, V), dtype=delta_dtype) if store_delta else None
    grid = (triton.cdiv(ncol, BV), HV, nseg)
    _state_fwd_kernel[grid](W, U, P, D, W if S0 is None else S0, _segments_tensor(first, W.device),
                            _segments_tensor(length, W.device), starts, final, final if delta is None else delta, HV,
                            K=K, V=V, C=C, BK=BK, BV=BV, SUMMARY=summary, STORE_STARTS=store_starts,
                            PRECISION=_precision(summary), STORE_DELTA=store_delta,
                            **launch_config("state_fwd", forward_warps(K, warps), stages))
    return starts, final, delta


def state_backward(W, U, P, D, starts, G, terminal, first, length, store_grads=True, narrow=False,
                   reuse_g=False, add_to: tuple[Tensor, Tensor] | None = None, delta: Tensor | None = None):
    """Launch the reverse pass; returns (dW, dU, dP, dD, dS_enter) (grads None when not ``store_grads``).

    ``reuse_g``: the caller no longer needs G (the gradient of the chunk states, [Nc, HV, K, V]) after this call:
    the split backward writes the adjoints Λ over it (each program reads a chunk's G tile before it writes that
    tile's Λ, and no other program touches it). ``add_to``: (dW, dU) tensors that receive dW and dU added to what
    they hold (the output stage's gradients, see stages.GradHandoff), returned in their place; dW None when the
    output stage left dU alone (stages.fused_dw: its dW follows from that dU and S here). ``delta``: the Δ the
    forward kept (:func:`keeps_delta`), read by the chunk-gradient kernel in place of U − W S."""
    Nc, HV, C, K = W.shape
    V = starts.shape[-1]
    BK, BV, warps, stages = _config(K, V, narrow, pass_stages=True)
    grads_stages = _config(K, V, narrow)[3]  # the chunk-gradient kernel: not a pass, not measured at 2 (K = 128)
    NV = triton.cdiv(V, BV)
    nseg = len(first)
    split = store_grads and split_backward_enabled(K)
    if U is None and store_grads and not (split and delta is not None):  # a path that reads U after all
        U = u_again(U, W, starts, delta)
    u_arg = W if U is None else U  # (unread then: the reverse pass never reads U, the chunk-gradient kernel reads Δ)
    if store_grads and not split:
        dW, dP = grad_buffer(W, (NV, Nc, HV, C, K)), grad_buffer(W, (NV, Nc, HV, C, K))
        dD, dU = grad_buffer(W, (NV, Nc, HV, K)), grad_buffer(W, (Nc, HV, C, V))
    else:
        dW = dP = dD = dU = grad_buffer(W, (1,))
    # Λ is stored in G's dtype: float32, or bfloat16 when the output stage left dS so (stages.adjoint_dtype)
    in_place = split and reuse_g and G.is_contiguous()
    lam = (G if in_place else W.new_empty((Nc, HV, K, V), dtype=G.dtype)) if split else grad_buffer(W, (1,))
    dS0 = grad_buffer(W, (nseg, HV, K, V))
    _state_bwd_kernel[(NV, HV, nseg)](W, u_arg, P, D, starts, G, terminal, _segments_tensor(first, W.device),
                                       _segments_tensor(length, W.device), dW, dU, dP, dD, dS0, lam, HV, Nc * HV,
                                       K=K, V=V, C=C, BK=BK, BV=BV, STORE_GRADS=store_grads and not split,
                                       STORE_LAM=split, PRECISION=_precision(False),
                                       **launch_config("state_bwd", warps, stages))
    from_sum = add_to is not None and add_to[0] is None
    if split:
        dW, dU = add_to if add_to is not None else (grad_buffer(W, (Nc, HV, C, K)), grad_buffer(W, (Nc, HV, C, V)))
        dW = grad_buffer(W, (Nc, HV, C, K)) if from_sum else dW
        dP, dD = grad_buffer(W, (Nc, HV, C, K)), grad_buffer(W, (Nc, HV, K))
        if not launch_or_fallback("state_grads", lambda: _state_grads_kernel[(Nc, HV)](
                W, u_arg, P, starts, lam, dW, dU, dP, dD, u_arg if delta is None else delta, HV, K=K, V=V, C=C, BK=BK,
                BV=BV, ACCUMULATE=add_to is not None, PRECISION=_precision(False), HAS_DELTA=delta is not None,
                DW_FROM_SUM=from_sum, **launch_config("state_grads", warps, grads_stages))):
            # Λ may already be in G's storage: no retry from G, but the grads follow from Λ and S directly
            _state_grads_torch(W, u_again(U, W, starts, delta), P, starts, lam, dW, dU, dP, dD,
                               accumulate=add_to is not None, dw_from_sum=from_sum)
        return dW, dU, dP, dD, dS0
    if not store_grads:
        return None, None, None, None, dS0
    if NV == 1:  # one V block: the partial slots are the gradients (a sum would copy them)
        dW, dP, dD = dW[0], dP[0], dD[0]
    else:
        dW, dP, dD = dW.sum(0), dP.sum(0), dD.sum(0)
    if add_to is not None:
        dW, dU = left_dW(add_to, starts).add_(dW), add_to[1].add_(dU)
    return dW, dU, dP, dD, dS0


def _state_grads_torch(W, U, P, starts, lam, dW, dU, dP, dD, accumulate: bool, dw_from_sum: bool = False) -> None:
    """:func:`_state_grads_kernel` in PyTorch (its fallback), writing (or adding) into the same tensors."""
    W, U, P, starts, lam = (t.float() for t in (W, U, P, starts, lam))
    d_u = P @ lam  # [Nc, HV, C, V]
    if dw_from_sum:
        dU.add_(d_u)
        dW.copy_(-(dU @ starts.mT))
    elif accumulate:
        dW.add_(-(d_u @ starts.mT))
        dU.add_(d_u)
    else:
        dW.copy_(-(d_u @ starts.mT))
        dU.copy_(d_u)
    dP.copy_((U - W @ starts) @ lam.mT)
    dD.copy_((starts * lam).sum(-1))


def remake_starts(first, length, narrow, dtype, W, U, P, d, S_sub) -> Tensor:
    """The states entering every chunk again (backward, when they were not kept): the forward pass from the
    entering states of the sub-segments ``first``/``length``; d as the WY stage gives it ([Nc, HV] or [.., K])."""
    D = (d[..., None] if d.dim() == 2 else d).expand(W.shape[0], W.shape[1], W.shape[-1]).contiguous()
    return state_forward(W, U, P, D, S_sub, first, length, narrow=narrow, starts_dtype=dtype)[0]


def split_segments(seg_first, seg_len, sub_len: int):
    """Cut each segment's chunk range into sub-segments of at most ``sub_len`` chunks.

    Returns (first, length, segment, position) per sub-segment, ordered by segment then position.
    """
    out = []
    for s, (f, n) in enumerate(zip(seg_first, seg_len)):
        for i, lo in enumerate(range(0, n, sub_len)):
            out.append((f + lo, min(sub_len, n - lo), s, i))
    return out


def last_subs(subs) -> list[int]:
    """Index of the last sub-segment of every segment (``subs`` as made by :func:`split_segments`)."""
    return [i for i, s in enumerate(subs) if i + 1 == len(subs) or subs[i + 1][2] != s[2]]


def default_sub_len(seg_len, HV: int, V: int, device, summaries_needed: bool = False) -> int:
    """Sub-segment length (in chunks) for the pass over segments of ``seg_len`` chunks.

    One GPU: every segment runs as one sequential pass when that alone gives the GPU programs for at least a
    quarter of its SMs — H100 session m (B = 1, H = 16, K = V = 128: 64 programs): cutting 8 sub-segments cost what
    it saved (their summaries at tf32x3 on K + V columns and the folds against 8× shorter passes; PGDN fwd+bwd
    0.999× / 0.996× at 32K / 128K without), and a single pass can prefetch (see :func:`_config`). Fewer programs
    (few heads, B = 1): sub-segments for about 4 waves of the SMs. ``summaries_needed`` (CP: the pieces' summaries
    are exchanged anyway): always the 4-wave cut. The interpreter always cuts, so that CPU tests exercise it.

    PDELTA_SUB_LEN=N (chunks) overrides it for GPU A/B runs; 0 turns segment parallelism off (every segment one
    sequential pass, no summaries, no folds)."""
    total = sum(seg_len)
    longest = max(1, max(seg_len, default=1))
    forced = os.environ.get("PDELTA_SUB_LEN")
    if forced is not None:
        if not forced.isdigit():
            raise ValueError(f"PDELTA_SUB_LEN={forced!r}: give a whole number of chunks (0: no sub-segments)")
        return int(forced) or longest
    programs_per_sub = HV * triton.cdiv(V, _config(V, V)[1])
    sms = num_sms(device)
    if not (summaries_needed or INTERPRET) and len(seg_len) * programs_per_sub >= sms // 4:
        return longest
    wanted_subs = max(1, (4 * sms) // max(1, programs_per_sub))
    return max(4 if INTERPRET else 16, -(-total // wanted_subs))


class StatePass(torch.autograd.Function):
    """(W, U, P̃, d, S_enter) -> (state entering every chunk [Nc,HV,K,V], final state of every segment, Δ [Nc, HV,
    C, V] or None: see :func:`keeps_delta`; no gradient flows through it, its readers differentiate U − W S).

    Segments longer than ``sub_len`` chunks run as parallel sub-segments joined by their affine summaries.
    Call through :func:`state_pass`, which falls back to PyTorch when the kernels do not fit the GPU.
    """

    @staticmethod
    def forward(ctx, W, U, P, D, S_enter, seg_first, seg_len, sub_len, narrow, recompute, handoff, dtype,
                keep_delta=False):
        ctx.set_materialize_grads(False)  # S's gradient may come through the handoff: no zero-filled stand-in
        subs = split_segments(seg_first, seg_len, sub_len)
        first, length = [s[0] for s in subs], [s[1] for s in subs]
        split = len(subs) > len(seg_first)
        M = None
        if split:
            _, maps, _ = state_forward(W, U, P, D, None, first, length, summary=True, store_starts=False,
                                       narrow=narrow)
            K = W.shape[-1]
            M, b = maps[..., :K], maps[..., K:]
            S_sub = _fold_forward(M, b, S_enter, subs)
        else:
            S_sub = S_enter.contiguous()
        starts, finals, delta = state_forward(W, U, P, D, S_sub, first, length, narrow=narrow, starts_dtype=dtype,
                                              delta_dtype=dtype if keep_delta else None)
        last = last_subs(subs)
        kept = save_states(ctx, recompute, starts, functools.partial(remake_starts, first, length, narrow, dtype),
                           S_sub)
        save_wy(ctx, recompute, (W, U, P), D, S_enter, kept, M, delta)
        if recompute is not None:
            recompute.without_u(delta, W.shape[-1])
        ctx.subs, ctx.last, ctx.segments, ctx.handoff = subs, last, (seg_first, seg_len), handoff
        arm_state_pass(handoff)
        if delta is not None:
            ctx.mark_non_differentiable(delta)
        return starts, take_rows(finals, last), delta

    @staticmethod
    def backward(ctx, g_starts, g_final, g_delta=None):
        (W, U, P), (D, S_enter, starts, M, delta) = load_wy(ctx, states_at=2)
        g_starts = arriving_state_grad(ctx.handoff, g_starts)
        left = None if ctx.handoff is None else ctx.handoff.take("state_pass")
        grads = _with_narrow_retry(lambda narrow: _kernel_backward(ctx, W, U, P, D, starts, M, g_starts, g_final,
                                                                   narrow, left, delta))
        if grads is None:  # recompute the pass in PyTorch and differentiate that
            g_starts = None if g_starts is None else g_starts.float()  # (bfloat16 when stages.adjoint_dtype says so)
            U = u_again(U, W, starts, delta).float()
            grads = add_left(torch_form_grads(lambda *t: state_pass_torch(*t, *ctx.segments),
                                              (W.float(), U, P.float(), D, S_enter), (g_starts, g_final)),
                             left, starts)
        return (*grads, None, None, None, None, None, None, None, None)


def arm_state_pass(handoff: GradHandoff | None) -> None:
    """Arm the slots the state pass takes from in backward: "state_pass" (the output stage's dW, dU, added
    in-kernel) and "states" (the gradient of S in float32, whatever S's storage dtype)."""
    arm(handoff, "state_pass")
    arm(handoff, "states")


def arriving_state_grad(handoff: GradHandoff | None, g_starts: Tensor | None) -> Tensor | None:
    """The gradient of the chunk states: from the handoff's "states" slot when the output stage left it there
    (float32, or bfloat16 under PDELTA_ADJOINTS_BF16=1), else as autograd gave it (None: no gradient)."""
    left = take_one(handoff, "states")
    return g_starts if left is None else left


def zero_or_float(g: Tensor | None, like: Tensor) -> Tensor:
    """``g`` as a contiguous float32 tensor (bfloat16 stays: the kernels widen it as they load, see
    stages.adjoint_dtype), or float32 zeros shaped like ``like`` when there is none."""
    if g is None:
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return (g if g.dtype == torch.bfloat16 else g.float()).contiguous()


def _kernel_backward(ctx, W, U, P, D, starts, M, g_starts, g_final, narrow, left, delta=None):
    subs, last = ctx.subs, ctx.last
    first, length = [s[0] for s in subs], [s[1] for s in subs]
    HV, K, V = W.shape[1], W.shape[-1], starts.shape[-1]
    g_starts = zero_or_float(g_starts, starts)
    g_final = grad_buffer(W, (len(last), HV, K, V), zeros=True) if g_final is None else g_final
    terminal = grad_buffer(W, (len(subs), HV, K, V), zeros=True)
    put_rows(terminal, last, g_final)
    if M is not None:
        *_, local = state_backward(W, U, P, D, starts, g_starts, torch.zeros_like(terminal), first, length,
                                   store_grads=False, narrow=narrow)
        terminal = _fold_backward(M, local, terminal, subs, last)
    dW, dU, dP, dD, dS0 = state_backward(W, U, P, D, starts, g_starts, terminal.contiguous(), first, length,
                                         narrow=narrow, reuse_g=ctx.handoff is not None, add_to=left, delta=delta)
    first_sub = [i for i, s in enumerate(subs) if s[3] == 0]
    return dW, dU, dP, dD, take_rows(dS0, first_sub)


def state_pass_torch(W: Tensor, U: Tensor, P: Tensor, D: Tensor, S_enter: Tensor, seg_first, seg_len):
    """The same pass as a PyTorch loop over chunks (differentiable by autograd): the kernels' fallback."""
    starts = [None] * W.shape[0]
    finals = []
    for s, (f, n) in enumerate(zip(seg_first, seg_len)):
        S = S_enter[s]
        for c in range(f, f + n):
            starts[c] = S
            S = D[c][..., None] * S + P[c].mT @ (U[c] - W[c] @ S)
        finals.append(S)
    zero = S_enter.new_zeros(S_enter.shape[1:])
    return torch.stack([zero if t is None else t for t in starts]), torch.stack(finals)


def _fold_forward(M, b, S_enter, subs):
    """State entering every sub-segment: S_in(i+1) = M_i S_in(i) + b_i within each segment."""
    S_in = [None] * len(subs)
    state = {}
    for i, (_, _, seg, pos) in enumerate(subs):
        cur = S_enter[seg] if pos == 0 else state[seg]
        S_in[i] = cur
        state[seg] = M[i] @ cur + b[i]
    return torch.stack(S_in).contiguous()


def _fold_backward(M, local, terminal, subs, last):
    """Adjoint leaving every sub-segment: Λ_out(i) = Λ_in(i+1) = local(i+1) + M_{i+1}ᵀ Λ_out(i+1)."""
    out = terminal.clone()
    for i in range(len(subs) - 2, -1, -1):
        if i in last:
            continue
        out[i] = local[i + 1] + M[i + 1].mT @ out[i + 1]
    return out


def state_pass(W: Tensor, U: Tensor, P: Tensor, D: Tensor, S_enter: Tensor, seg_first, seg_len,
               sub_len: int | None = None, recompute: Recompute | None = None,
               handoff: GradHandoff | None = None, input_dtype: torch.dtype = torch.float32,
               keep_delta: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """W, P [Nc,HV,C,K]; U [Nc,HV,C,V]; D [Nc,HV,K]; S_enter [Nseg,HV,K,V] (float32) -> (starts, finals, Δ or None).
    ``recompute``: remakes (W, U, P̃) in backward instead of keeping them (see stages.Recompute).
    ``handoff``: shared with the one stage that reads ``starts`` (the output stage): the gradient arriving for
    ``starts`` is private to this pass (backward overwrites it, see :func:`state_backward`), and that stage's dW,
    dU wait there for this pass's own to be added (see stages.GradHandoff). ``input_dtype``: the op's inputs'
    dtype, which sets the storage of ``starts`` (see :func:`states_dtype`). ``keep_delta``: also return every
    chunk's Δ = U − W S (:func:`keeps_delta`; None when the PyTorch fallback ran), else None third."""
    if sub_len is None:
        sub_len = default_sub_len(seg_len, W.shape[1], U.shape[-1], W.device)
    args = [t.contiguous() for t in (W, U, P, D, S_enter)]
    dtype = states_dtype(handoff, input_dtype)
    out = _with_narrow_retry(lambda narrow: StatePass.apply(*args, tuple(seg_first), tuple(seg_len), sub_len,
                                                            narrow, recompute, handoff, dtype, keep_delta))
    return out if out is not None else (*state_pass_torch(*args, seg_first, seg_len), None)
