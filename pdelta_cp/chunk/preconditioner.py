"""Chunkwise preconditioner ("ATK") scan and the squash that turns A into the write key.

Per chunk (local inclusive cumsum G_i of g_atk, total sigma = G_C, U_i = beta_atk_i k̂_i^2):

    A_i = exp(G_i) A_start + sum_{j<=i} exp(G_i - G_j) U_j          (A_start: state entering the chunk)
    chunk map: A_end = exp(sigma) A_start + a,   a = sum_j exp(sigma - G_j) U_j

The chunk maps are diagonal affine summaries (:mod:`.summary`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .gram import causal_mask


@dataclass
class PreconditionerChunks:
    """Per-chunk maps of the A scan. Shapes: [Nc, H, C] / [Nc, H, K]."""

    G: Tensor  # inclusive cumulative log-decay inside the chunk
    decay: Tensor  # exp(sigma) broadcast to [Nc, H, K]: the diagonal of the chunk map
    end: Tensor  # a: the chunk's end state from a zero entering state


class _WeightedSquares(torch.autograd.Function):
    """Σ_c w_c k_c² [Nc, H, K] from w [Nc, H, C], k [Nc, H, C, K], saving only w and k (k is saved by the later
    stages anyway) instead of k² and its reshaped copies, as autograd of einsum would."""

    @staticmethod
    def forward(ctx, w: Tensor, k: Tensor) -> Tensor:
        ctx.save_for_backward(w, k)
        return torch.einsum("nhc,nhck->nhk", w, k * k)

    @staticmethod
    def backward(ctx, d_end: Tensor):
        w, k = ctx.saved_tensors
        d_w = torch.einsum("nhk,nhck->nhc", d_end, k * k) if ctx.needs_input_grad[0] else None
        d_k = 2 * k * (w[..., None] * d_end[:, :, None, :]) if ctx.needs_input_grad[1] else None
        return d_w, d_k


def preconditioner_chunks(k_hat: Tensor, g_atk: Tensor, beta_atk: Tensor,
                          weighted_squares=_WeightedSquares.apply) -> PreconditionerChunks:
    """k_hat [Nc, H, C, K]; g_atk, beta_atk [Nc, H, C]: a = Σ_j exp(σ − G_j) β_atk,j k̂_j², decay = exp(σ).
    ``weighted_squares(w, k)`` = Σ_c w_c k_c² (the Triton backend passes its kernel)."""
    G = g_atk.cumsum(-1)
    weights = torch.exp(G[..., -1:] - G) * beta_atk  # [Nc, H, C], exponents <= 0
    end = weighted_squares(weights, k_hat)
    return PreconditionerChunks(G=G, decay=torch.exp(G[..., -1:]).expand_as(end), end=end)


def write_keys(k_hat: Tensor, g_atk: Tensor, beta_atk: Tensor, A_start: Tensor, centre: Tensor, x: float,
               eps: float) -> Tensor:
    """Write keys p = k̂ ⊙ m(A) [Nc, H, C, K], with A at every token from the state entering each chunk
    A_start [Nc, H, K]:  A_i = exp(G_i) A_start + Σ_{j<=i} exp(G_i − G_j) β_atk,j k̂_j²;  centre [H]."""
    C = k_hat.shape[-2]
    G = g_atk.cumsum(-1)
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal_mask(C, False, G.device), float("-inf"))
    A = torch.exp(G)[..., None] * A_start[..., None, :] + torch.exp(diff) @ (beta_atk[..., None] * k_hat * k_hat)
    return k_hat * squash_multiplier(A, centre[:, None, None], x, eps)
def squash_multiplier(A: Tensor, centre: Tensor, x: float, eps: float) -> Tensor:
    """m = x^(-s), s = r / (1 + |r|), r = log(A + eps) - centre; centre broadcasts against A."""
    r = torch.log(A + eps) - centre
    s = r / (1 + r.abs())
    return torch.exp(-math.log(x) * s)
