"""Ground truth: the preconditioned delta rule as a plain per-token loop.

This module imports nothing else from the project, so a reader can check it line by line against the
recurrences (`docs/algorithm.md` §1, paper-spec §3) and every faster path can be tested against it. Run it
in float64 to get reference values; it works in any floating dtype.

Per key head h and token t (all element-wise on the K channels):

    k̂_t = k_t / sqrt(|k_t|^2 + 1e-6)            q̂_t = scale * q_t / sqrt(|q_t|^2 + 1e-6)
    A_t = exp(g_atk_t) * A_{t-1} + beta_atk_t * k̂_t^2              (preconditioner state, [K])
    r_t = log(A_t + eps) - c_h ;  s_t = r_t / (1 + |r_t|) ;  m_t = x^(-s_t) ;  p_t = k̂_t * m_t

and per value head (key head h = value head // (HV // H)), with S in R^{K x V}:

    S'  = exp(g_t) * S_{t-1}          (PDN: g = 0; PGDN: scalar g; PKDA: per-channel g scales the K rows)
    δ_t = beta_t * (v_t - S'^T k̂_t)   read / erase with the raw key
    S_t = S' + p_t δ_t^T              write with the preconditioned key
    o_t = S_t^T q̂_t
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["naive_precond_delta_rule", "naive_short_conv"]


def _l2normalize(x: Tensor) -> Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def naive_precond_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g_atk: Tensor,
    beta_atk: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    x: float = 1.5,
    eps: float = 1e-6,
    log_atk_scale: float | Tensor = -0.2,
    qk_l2norm: bool = True,
    initial_state: Tensor | None = None,
    initial_A_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token reference. Shapes as in :func:`pdelta_cp.precond_delta_rule`.

    q, k [B,T,H,K]; v [B,T,HV,V]; beta [B,T,HV]; g_atk, beta_atk [B,T,H]; g None | [B,T,HV] | [B,T,HV,K];
    initial_state [N,HV,K,V]; initial_A_state [N,H,K]; cu_seqlens [N+1] (then B == 1).
    Returns o [B,T,HV,V] (dtype of v), final S [N,HV,K,V] and final A [N,H,K] (dtype of the computation:
    the promoted dtype of the inputs) or None twice when ``output_final_state`` is False.
    Arguments are not validated here: use the public op for that.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    dtype = torch.promote_types(q.dtype, torch.float32)
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(c) for c in cu_seqlens.tolist()]
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]

    def f(t: Tensor) -> Tensor:
        return t.to(dtype)

    q, k, v, beta, g_atk, beta_atk = map(f, (q, k, v, beta, g_atk, beta_atk))
    g = None if g is None else f(g)
    c = f(torch.as_tensor(log_atk_scale, device=q.device)).expand(H)
    log_x = math.log(x)

    rows: list[list[Tensor]] = [[] for _ in range(B)]  # per batch row: outputs of its sequences, in order
    finals_S, finals_A = [], []
    for n, (b, start, end) in enumerate(bounds):
        S = torch.zeros(HV, K, V, dtype=dtype, device=q.device)
        A = torch.zeros(H, K, dtype=dtype, device=q.device)
        if initial_state is not None:
            S = S + f(initial_state[n])
        if initial_A_state is not None:
            A = A + f(initial_A_state[n])
        outs = []
        for t in range(start, end):
            kt, qt = k[b, t], q[b, t]  # [H, K]
            if qk_l2norm:
                kt, qt = _l2normalize(kt), _l2normalize(qt)
            qt = qt * scale
            # preconditioner (per key head)
            A = torch.exp(g_atk[b, t])[:, None] * A + beta_atk[b, t][:, None] * kt * kt
            r = torch.log(A + eps) - c[:, None]
            s = r / (1 + r.abs())
            m = torch.exp(-log_x * s)
            pt = kt * m
            # delta rule (per value head)
            kv, pv, qv = (z.repeat_interleave(group, dim=0) for z in (kt, pt, qt))  # [HV, K]
            if g is None:
                S_dec = S
            elif g.dim() == 3:
                S_dec = torch.exp(g[b, t])[:, None, None] * S
            else:
                S_dec = torch.exp(g[b, t])[:, :, None] * S
            read = torch.einsum("hkv,hk->hv", S_dec, kv)
            delta = beta[b, t][:, None] * (v[b, t] - read)
            S = S_dec + pv[:, :, None] * delta[:, None, :]
            outs.append(torch.einsum("hkv,hk->hv", S, qv))
        rows[b].extend(outs)
        finals_S.append(S)
        finals_A.append(A)
    o = torch.stack([torch.stack(row) for row in rows]).to(v.dtype)  # [B, T, HV, V]
    if not output_final_state:
        return o, None, None
    return o, torch.stack(finals_S), torch.stack(finals_A)


def naive_short_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu",
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Causal depthwise conv, one sequence at a time: x [B,T,D], weight [D,W], bias [D] -> [B,T,D]."""
    B, T, D = x.shape
    width = weight.shape[1]
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(c) for c in cu_seqlens.tolist()]
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    rows: list[list[Tensor]] = [[] for _ in range(B)]
    for b, start, end in bounds:
        seq = x[b, start:end].T[None]  # [1, D, n]
        seq = torch.nn.functional.pad(seq, (width - 1, 0))
        y = torch.nn.functional.conv1d(seq, weight[:, None, :].to(x.dtype), bias, groups=D)[0].T
        rows[b].append(torch.nn.functional.silu(y) if activation == "silu" else y)
    return torch.stack([torch.cat(r) for r in rows])
