"""Affine state summaries and their associative composition.

A span of tokens maps the state entering it to the state leaving it by an affine map

    state_out = M · state_in + b

For the recurrent state S ([K, V] per value head) M is a dense [K, K] matrix (a product of
``alpha_t (I - beta_t p_t k̂_t^T)``, not symmetric); for the preconditioner state A ([K] per key head) M is
diagonal (the product of the decays) and is stored as a [K] vector. Running span 1 and then span 2 is the
map (M2 M1, M2 b1 + b2): composition is associative, which is what lets a rank summarise its chunks with a
log-depth tree instead of a chain, lets ranks exchange one summary each, and lets a rank fold the summaries
of all earlier pieces of the stream.

Summaries are stored as tensors ``(M, b)`` with arbitrary leading batch dims:
    dense:    M [..., K, K], b [..., K, V]
    diagonal: M [..., K],    b [..., K]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AffineKind:
    """How to compose and apply one kind of affine summary (dense or diagonal)."""

    dense: bool

    def apply(self, M: Tensor, state: Tensor) -> Tensor:
        """M · state."""
        return M @ state if self.dense else M * state

    def compose(self, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The map of running ``first`` then ``second``."""
        M1, b1 = first
        M2, b2 = second
        return (M2 @ M1 if self.dense else M2 * M1), self.apply(M2, b1) + b2

    def identity_like(self, M: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if self.dense:
            eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
            return eye.expand_as(M), torch.zeros_like(b)
        return torch.ones_like(M), torch.zeros_like(b)

    def reduce(self, M: Tensor, b: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
        """Compose the maps along ``dim`` (in order) with a log-depth pairwise tree.

        M, b: stacked maps with the sequence dim at ``dim``. Returns one map (that dim removed).
        """
        M, b = M.movedim(dim, 0), b.movedim(dim, 0)
        if M.shape[0] == 0:
            return self.identity_like(M.new_empty(M.shape[1:]), b.new_empty(b.shape[1:]))
        while M.shape[0] > 1:
            if M.shape[0] % 2:
                Mi, bi = self.identity_like(M[:1], b[:1])
                M, b = torch.cat([M, Mi]), torch.cat([b, bi])
            M, b = self.compose((M[0::2], b[0::2]), (M[1::2], b[1::2]))
        return M[0], b[0]


DENSE = AffineKind(dense=True)
DIAGONAL = AffineKind(dense=False)
