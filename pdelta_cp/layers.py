"""The paper's token mixer as a plain ``torch.nn.Module`` (no Megatron needed), with context parallelism.

Per token x ∈ R^d (docs/algorithm.md, paper-spec §6):
    q, k, v  = SiLU(ShortConv4(W_q x)), SiLU(ShortConv4(W_k x)), SiLU(ShortConv4(W_v x))
    beta     = sigmoid(W_b x)                              [HV]
    g        = -exp(A_log) * softplus(W_a x + dt_bias)     [HV]   (PGDN)   or per channel [HV, K] (PKDA:
               W_a is a low-rank d -> V -> HV*K map, dt_bias [HV*K]);  PDN: no decay
    beta_atk = sigmoid(W_b_atk x);  g_atk = -exp(A_log_atk) * softplus(W_a_atk x + dt_bias_atk)      [H]
    o        = precond_delta_rule(q, k, v, beta, g_atk, beta_atk, g, x=squash_x, log_atk_scale=c)
    o        = RMSNorm_per_head(o)   (PKDA: gated by sigmoid(W_g x), W_g low rank d -> V -> HV*V)
    y        = W_o o
Baselines for comparison: ``gdn`` / ``kda`` / ``deltanet`` are the same mixers with squash_x = 1 (no
preconditioning; the op then is exactly GDN / KDA / DeltaNet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .conv import short_conv
from .ops import precond_delta_rule

VARIANTS = ("pdn", "pgdn", "pkda", "deltanet", "gdn", "kda")
_DECAY = {"pdn": None, "deltanet": None, "pgdn": "scalar", "gdn": "scalar", "pkda": "channel", "kda": "channel"}


@dataclass
class MixerConfig:
    d_model: int
    num_heads: int
    head_dim: int
    num_v_heads: int | None = None  # grouped value heads (default: num_heads)
    variant: str = "pgdn"
    conv_size: int = 4
    squash_x: float = 1.5
    squash_eps: float = 1e-6
    log_atk_scale_init: float = -0.2
    a_log_init_lower: float = 0.0
    norm_eps: float = 1e-6


def _at_least_fp32(x: Tensor) -> Tensor:
    """Gates and norms run in float32 for 16-bit activations, and stay float64 for float64 ones."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _inverse_softplus_dt(n: int, lo: float = 1e-3, hi: float = 0.1, floor: float = 1e-4) -> Tensor:
    """dt ~ logU(lo, hi) clamped to >= floor, returned as softplus^-1(dt) (the paper's dt_bias init)."""
    dt = torch.exp(torch.rand(n) * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class _RMSNorm(torch.autograd.Function):
    """Keeps only x (usually alive anyway: a residual or the op's output) and the per-row 1/rms for backward;
    autograd of the plain formula keeps a float32 copy of x and of x/rms — 4x a bf16 x per norm. Not twice
    differentiable (backward uses the saved 1/rms as a constant)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = _at_least_fp32(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.to(x32.dtype)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = _at_least_fp32(x) * rstd
        dy32 = dy.to(x_hat.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # d/dx of w ⊙ x r: r (dy w - x̂ mean(dy w ⊙ x̂))
            dyw = dy32 * weight.to(x_hat.dtype)
            dx = (rstd * (dyw - x_hat * (dyw * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy32 * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] / rms(x) * weight [D], computed in (at least) float32 and returned in x's dtype."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class PrecondDeltaMixer(nn.Module):
    """x [B, T_local, d_model] -> [B, T_local, d_model]; CP arguments are passed through to the op and conv."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
        self.cfg = cfg
        H, K = cfg.num_heads, cfg.head_dim
        HV = cfg.num_v_heads or H
        self.H, self.HV, self.K = H, HV, K
        d = cfg.d_model
        self.decay = _DECAY[cfg.variant]
        self.preconditioned = cfg.variant in ("pdn", "pgdn", "pkda")
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, HV * K, bias=False)
        self.q_conv = nn.Parameter(torch.empty(H * K, cfg.conv_size))
        self.k_conv = nn.Parameter(torch.empty(H * K, cfg.conv_size))
        self.v_conv = nn.Parameter(torch.empty(HV * K, cfg.conv_size))
        self.b_proj = nn.Linear(d, HV, bias=False)
        if self.decay == "scalar":
            self.a_proj = nn.Linear(d, HV, bias=False)
            self.dt_bias = nn.Parameter(_inverse_softplus_dt(HV))
            self.A_log = nn.Parameter(torch.log(torch.empty(HV).uniform_(max(cfg.a_log_init_lower, 1e-4), 16)))
        elif self.decay == "channel":
            self.a_proj = nn.Sequential(nn.Linear(d, K, bias=False), nn.Linear(K, HV * K, bias=False))
            self.dt_bias = nn.Parameter(_inverse_softplus_dt(HV * K))
            self.A_log = nn.Parameter(torch.log(torch.empty(HV).uniform_(max(cfg.a_log_init_lower, 1.0), 16)))
        self.b_atk_proj = nn.Linear(d, H, bias=False)
        self.a_atk_proj = nn.Linear(d, H, bias=False)
        self.dt_bias_atk = nn.Parameter(_inverse_softplus_dt(H))
        self.A_log_atk = nn.Parameter(torch.log(torch.empty(H).uniform_(max(cfg.a_log_init_lower, 1e-4), 16)))
        self.log_atk_scale = nn.Parameter(torch.full((H,), cfg.log_atk_scale_init))
        self.o_norm = RMSNorm(K, cfg.norm_eps)
        if self.decay == "channel":  # KDA-style output gate
            self.g_proj = nn.Sequential(nn.Linear(d, K, bias=False), nn.Linear(K, HV * K, bias=True))
        self.o_proj = nn.Linear(HV * K, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for w in (self.q_conv, self.k_conv, self.v_conv):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: Tensor, *, cu_seqlens: Tensor | None = None, cp_group=None,
                cp_layout: str = "contiguous", backend: str = "auto") -> Tensor:
        B, T, _ = x.shape
        projections = MixerProjections(
            q=self.q_proj(x), k=self.k_proj(x), v=self.v_proj(x), beta=self.b_proj(x), g_atk=self.a_atk_proj(x),
            decay=self.a_proj(x) if self.decay else None, beta_atk=self.b_atk_proj(x),
            out_gate=self.g_proj(x) if self.decay == "channel" else None)
        o = mixer_core(self, projections, cu_seqlens=cu_seqlens, cp_group=cp_group, cp_layout=cp_layout,
                       backend=backend)
        return self.o_proj(o.reshape(B, T, -1))


@dataclass
class MixerProjections:
    """Per-token projections of x [B, T, *] for :func:`mixer_core` (local heads under tensor parallelism).

    q, k [.., H*K]; v [.., HV*K]; beta, decay [.., HV] (decay [.., HV*K] per channel; None for PDN);
    g_atk, beta_atk [.., H] (preconditioner decay and gain logits); out_gate [.., HV*K] (PKDA) or None.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    decay: Tensor | None
    g_atk: Tensor
    beta_atk: Tensor
    out_gate: Tensor | None


def mixer_core(m, p: MixerProjections, *, cu_seqlens=None, cp_group=None, cp_layout="contiguous",
               backend="auto") -> Tensor:
    """Conv (with the CP halo), gates, the recurrence and the output norm/gate: o [B, T, HV, K].

    ``m`` holds the per-head parameters (local heads): q_conv/k_conv/v_conv, A_log, dt_bias, A_log_atk,
    dt_bias_atk, log_atk_scale, o_norm, and H, HV, K, decay, preconditioned, cfg. Shared by the plain
    module above and the Megatron mixer, so both compute exactly the same function.
    """
    B, T, _ = p.q.shape
    H, HV, K = m.H, m.HV, m.K
    cp = dict(cu_seqlens=cu_seqlens, cp_group=cp_group, cp_layout=cp_layout)
    # one conv call for q, k and v: one halo exchange per layer, and a single chain of collectives so
    # that every rank meets the backward collectives in the same order
    conv_weight = torch.cat([m.q_conv, m.k_conv, m.v_conv])
    qkv = short_conv(torch.cat([p.q, p.k, p.v], dim=-1), conv_weight, activation="silu", **cp)
    q, k, v = qkv.split([H * K, H * K, HV * K], dim=-1)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, K)
    beta = torch.sigmoid(_at_least_fp32(p.beta))
    g = None
    if m.decay == "scalar":
        g = -torch.exp(m.A_log) * F.softplus(_at_least_fp32(p.decay) + m.dt_bias)
    elif m.decay == "channel":
        g = -torch.exp(m.A_log).repeat_interleave(K) * F.softplus(_at_least_fp32(p.decay) + m.dt_bias)
        g = g.view(B, T, HV, K)
    beta_atk = torch.sigmoid(_at_least_fp32(p.beta_atk))
    g_atk = -torch.exp(m.A_log_atk) * F.softplus(_at_least_fp32(p.g_atk) + m.dt_bias_atk)
    o, _, _ = precond_delta_rule(
        q, k, v, beta.to(q.dtype), g_atk, beta_atk.to(q.dtype), g,
        x=m.cfg.squash_x if m.preconditioned else 1.0, eps=m.cfg.squash_eps,
        log_atk_scale=m.log_atk_scale, backend=backend, **cp)
    o = m.o_norm(o)
    if p.out_gate is not None:
        o = o * torch.sigmoid(p.out_gate).view(B, T, HV, K)
    return o
