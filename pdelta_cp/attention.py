"""Causal softmax attention for hybrid models, context parallel by an all-gather of keys and values.

Hybrid stacks put a softmax-attention layer every k-th layer. Under CP each rank keeps its queries and
gathers every rank's keys and values (memory O(T) per rank: fine for occasional layers, and exact); the
causal, per-sequence mask and the rotary embeddings use the tokens' global positions, so any CP layout
(contiguous, zigzag, per-sequence zigzag) gives the single-process result.
"""
from __future__ import annotations

import bisect

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .cp.comm import all_gather, world_and_rank
from .cp.layout import rank_pieces


def _positions(row_len: int, cu: list[int] | None, world: int, rank: int, layout: str) -> tuple[Tensor, Tensor]:
    """(position inside its sequence, sequence id) of every token ``rank`` holds of one row of ``row_len``."""
    idx = [t for s, e in rank_pieces(world, rank, layout if world > 1 else "contiguous", row_len, cu)
           for t in range(s, e)]
    starts = cu[:-1] if cu else [0]
    seq = [bisect.bisect_right(starts, t) - 1 for t in idx]
    return torch.tensor([t - starts[s] for t, s in zip(idx, seq)]), torch.tensor(seq)


def rotary(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding of x [B, T, H, D] at positions pos [T] (D even)."""
    D = x.shape[-1]
    freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.to(x.device, torch.float32)[:, None] * freq[None, :]
    cos, sin = torch.cos(angle)[None, :, None, :].to(x.dtype), torch.sin(angle)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """x [B, T_local, d] -> [B, T_local, d]; same CP keywords as the mixer."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model ({d_model}) must split into {num_heads} heads of even size")
        self.H, self.D = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        for w in (self.qkv.weight, self.out.weight):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: Tensor, *, cu_seqlens: Tensor | None = None, cp_group=None, cp_layout: str = "contiguous",
                backend: str = "auto") -> Tensor:
        B, T, _ = x.shape
        world, rank = world_and_rank(cp_group)
        cu = None if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
        row = T * world
        pos_q, seq_q = _positions(row, cu, world, rank, cp_layout)
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.D).unbind(2)
        q, k = rotary(q, pos_q), rotary(k, pos_q)
        if world > 1:
            kv = all_gather(torch.stack([k, v]), cp_group)  # [W, 2, B, T, H, D], rank order
            k, v = (kv[:, i].permute(1, 0, 2, 3, 4).reshape(B, world * T, self.H, self.D) for i in (0, 1))
            keys = [_positions(row, cu, world, r, cp_layout) for r in range(world)]
            pos_k, seq_k = torch.cat([p for p, _ in keys]), torch.cat([s for _, s in keys])
        else:
            pos_k, seq_k = pos_q, seq_q
        mask = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask.to(x.device))
        return self.out(o.transpose(1, 2).reshape(B, T, self.H * self.D))
