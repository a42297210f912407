"""Decay-weighted Gram matrices inside a chunk, computed without overflow.

    gram(a, b, Γ)_ij = sum_d a_id b_jd exp(Γ_id - Γ_jd)   for i >= j (i > j when strict), else 0

Γ is the inclusive cumulative log-decay inside the chunk: [..., C, 1] for a scalar decay per token (PDN,
PGDN) or [..., C, K] for a per-channel decay (PKDA). Γ is non-increasing in i, so every factor used below is
exp(non-positive) <= 1: nothing overflows however strong the decay.
"""
from __future__ import annotations

import torch
from torch import Tensor

SUB_CHUNK = 16  # per-channel decay: rows are processed in blocks of this size around a local reference


def causal_mask(C: int, strict: bool, device) -> Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def gram(a: Tensor, b: Tensor, gamma: Tensor, strict: bool) -> Tensor:
    """a, b [..., C, K]; gamma [..., C, 1] or [..., C, K] -> [..., C, C]."""
    C = a.shape[-2]
    mask = causal_mask(C, strict, a.device)
    if gamma.shape[-1] == 1:
        g = gamma[..., 0]
        diff = (g[..., :, None] - g[..., None, :]).masked_fill(~mask, float("-inf"))
        return (a @ b.mT) * torch.exp(diff)
    rows = []
    for r0 in range(0, C, SUB_CHUNK):
        r1 = min(r0 + SUB_CHUNK, C)
        blocks = []
        if r0 > 0:
            # columns before the block: split exp(Γ_i - Γ_j) at the reference Γ_{r0-1}
            ref = gamma[..., r0 - 1 : r0, :]
            left = a[..., r0:r1, :] * torch.exp(gamma[..., r0:r1, :] - ref)
            right = b[..., :r0, :] * torch.exp(ref - gamma[..., :r0, :])
            blocks.append(left @ right.mT)
        # diagonal block: the exact [n, n, K] decay tensor (small)
        gb = gamma[..., r0:r1, :]
        diff = gb[..., :, None, :] - gb[..., None, :, :]
        block_mask = mask[r0:r1, r0:r1, None]
        decay = torch.exp(diff.masked_fill(~block_mask, float("-inf")))
        blocks.append(torch.einsum("...ik,...jk,...ijk->...ij", a[..., r0:r1, :], b[..., r0:r1, :], decay))
        if r1 < C:
            blocks.append(a.new_zeros(a.shape[:-2] + (r1 - r0, C - r1)))
        rows.append(torch.cat(blocks, dim=-1))
    return torch.cat(rows, dim=-2)
