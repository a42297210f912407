"""The asymmetric WY/UT chunk form of the preconditioned delta rule.

Inside a chunk (local inclusive cumulative log-decay Γ, [C, 1] scalar or [C, K] per channel; keys per value
head; S the state entering the chunk, [K, V]):

    L   = diag(β) gram_strict(K̂, P, Γ)          rows from the raw key, columns from the write key
    W   = (I + L)^-1 diag(β) (K̂ ⊙ e^Γ)          U = (I + L)^-1 diag(β) V
    Δ   = U - W S                                 the chunk's pseudo-values
    O   = (Q̂ ⊙ e^Γ) S + gram(Q̂, P, Γ) Δ
    S'  = Diag(e^{Γ_C}) S + P̃^T Δ,   P̃ = P ⊙ e^{Γ_C - Γ}

so the chunk's affine state map is M = Diag(e^{Γ_C}) - P̃^T W, b = P̃^T U (:mod:`.summary`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gram import gram


@dataclass
class DeltaChunks:
    """Per-chunk quantities, value-head major: [Nc, HV, C, *]."""

    q_decayed: Tensor  # Q̂ ⊙ e^Γ            [Nc, HV, C, K]
    qp: Tensor  # gram(Q̂, P, Γ)             [Nc, HV, C, C]
    W: Tensor  # [Nc, HV, C, K]
    U: Tensor  # [Nc, HV, C, V]
    p_tilde: Tensor  # P ⊙ e^{Γ_C - Γ}      [Nc, HV, C, K]
    decay: Tensor  # e^{Γ_C}                [Nc, HV, 1 or K]

    def step(self, ids: Tensor, S: Tensor) -> Tensor:
        """States entering chunks ``ids`` [n, HV, K, V] -> states leaving them."""
        delta = self.U[ids] - self.W[ids] @ S
        return self.decay[ids][..., None] * S + self.p_tilde[ids].mT @ delta

    def maps(self, ids) -> tuple[Tensor, Tensor]:
        """Affine maps (M [n, HV, K, K], b [n, HV, K, V]) of chunks ``ids``."""
        p_t = self.p_tilde[ids].mT
        K = p_t.shape[-2]
        M = torch.diag_embed(self.decay[ids].expand(*p_t.shape[:-2], K)) - p_t @ self.W[ids]
        return M, p_t @ self.U[ids]

    def output(self, S_start: Tensor) -> Tensor:
        """Outputs [Nc, HV, C, V] from the states entering every chunk [Nc, HV, K, V]."""
        delta = self.U - self.W @ S_start
        return self.q_decayed @ S_start + self.qp @ delta


def wy_form(k_hat: Tensor, p: Tensor, v: Tensor, beta: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W, U, P̃, e^{Γ_C}) from k_hat, p [..., C, K]; v [..., C, V]; beta [..., C]; gamma [..., C, 1 or K]."""
    C = k_hat.shape[-2]
    eye = torch.eye(C, dtype=k_hat.dtype, device=k_hat.device)
    system = eye + beta[..., None] * gram(k_hat, p, gamma, strict=True)
    W = torch.linalg.solve_triangular(system, beta[..., None] * k_hat * torch.exp(gamma), upper=False,
                                      unitriangular=True)
    U = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    gamma_end = gamma[..., -1:, :]
    return W, U, p * torch.exp(gamma_end - gamma), torch.exp(gamma_end[..., 0, :])


def delta_chunks(q_hat: Tensor, k_hat: Tensor, p: Tensor, v: Tensor, beta: Tensor, g: Tensor | None) -> DeltaChunks:
    """q_hat, k_hat, p [Nc, HV, C, K]; v [Nc, HV, C, V]; beta [Nc, HV, C]; g None | [Nc, HV, C] | [Nc, HV, C, K]."""
    if g is None:
        gamma = torch.zeros_like(beta)[..., None]
    elif g.dim() == beta.dim():
        gamma = g.cumsum(-1)[..., None]
    else:
        gamma = g.cumsum(-2)
    W, U, p_tilde, decay = wy_form(k_hat, p, v, beta, gamma)
    return DeltaChunks(q_decayed=q_hat * torch.exp(gamma), qp=gram(q_hat, p, gamma, strict=False), W=W, U=U,
                       p_tilde=p_tilde, decay=decay)
