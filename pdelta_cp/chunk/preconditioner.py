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
    """Per-chunk quantities of the A scan. Shapes: [Nc, H, C] / [Nc, H, C, K] / [Nc, H, K]."""

    G: Tensor  # inclusive cumulative log-decay inside the chunk
    intra: Tensor  # A_i for a zero entering state
    decay: Tensor  # exp(sigma) broadcast to [Nc, H, K]: the diagonal of the chunk map
    end: Tensor  # a: the chunk's end state from a zero entering state


def preconditioner_chunks(k_hat: Tensor, g_atk: Tensor, beta_atk: Tensor) -> PreconditionerChunks:
    """k_hat [Nc, H, C, K]; g_atk, beta_atk [Nc, H, C]."""
    C = k_hat.shape[-2]
    G = g_atk.cumsum(-1)
    U = beta_atk[..., None] * k_hat * k_hat
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal_mask(C, False, G.device), float("-inf"))
    intra = torch.exp(diff) @ U
    decay = torch.exp(G[..., -1:]).expand_as(intra[..., -1, :])
    return PreconditionerChunks(G=G, intra=intra, decay=decay, end=intra[..., -1, :])


def preconditioner_tokens(chunks: PreconditionerChunks, A_start: Tensor) -> Tensor:
    """A at every token: [Nc, H, C, K], from the state entering each chunk A_start [Nc, H, K]."""
    return torch.exp(chunks.G)[..., None] * A_start[..., None, :] + chunks.intra


def squash_multiplier(A: Tensor, centre: Tensor, x: float, eps: float) -> Tensor:
    """m = x^(-s), s = r / (1 + |r|), r = log(A + eps) - centre; centre broadcasts against A."""
    r = torch.log(A + eps) - centre
    s = r / (1 + r.abs())
    return torch.exp(-math.log(x) * s)
