"""Head all-to-all context parallelism (DeepSpeed-Ulysses / Megatron GDN style), as a baseline.

Each rank holds T/W tokens of every head; an all-to-all gives it all T tokens of H/W key heads (and the
matching value heads), the unchanged single-device op runs on the full sequence, and a second all-to-all
returns the outputs. Traffic grows with T (the activations move), heads must divide by W, and every rank
scans the full sequence: the state-passing CP of :func:`pdelta_cp.precond_delta_rule` avoids all three.
Kept for benchmarks and as an independent check of that CP. Contiguous layout, no final states.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import precond_delta_rule


class _AllToAll(torch.autograd.Function):
    """Split dim ``scatter`` into W parts, send part j to rank j, concatenate the received parts along ``gather``."""

    @staticmethod
    def forward(ctx, x: Tensor, group, scatter: int, gather: int) -> Tensor:
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        world = dist.get_world_size(group)
        parts = [p.contiguous() for p in x.chunk(world, dim=scatter)]
        out = [torch.empty_like(p) for p in parts]
        dist.all_to_all(out, parts, group=group)
        return torch.cat(out, dim=gather)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.group, ctx.gather, ctx.scatter), None, None, None


def _seq_to_heads(x: Tensor, group) -> Tensor:
    """[B, T/W, heads, ...] on each rank -> [B, T, heads/W, ...]."""
    return _AllToAll.apply(x, group, 2, 1)


def _heads_to_seq(x: Tensor, group) -> Tensor:
    return _AllToAll.apply(x, group, 1, 2)


def ulysses_precond_delta_rule(q, k, v, beta, g_atk, beta_atk, g=None, *, cp_group, **kwargs) -> Tensor:
    """Same inputs as :func:`pdelta_cp.precond_delta_rule` (contiguous CP layout, B rows, no cu_seqlens);
    returns o [B, T/W, HV, V]. Heads (H and HV) must be divisible by the group size."""
    world = dist.get_world_size(cp_group)
    H, HV = q.shape[2], v.shape[2]
    if H % world or HV % world:
        raise ValueError(f"head all-to-all CP needs the key heads ({H}) and value heads ({HV}) to be divisible "
                         f"by the CP size {world}")
    log_atk_scale = kwargs.pop("log_atk_scale", -0.2)
    if isinstance(log_atk_scale, Tensor) and log_atk_scale.dim() == 1:
        rank = dist.get_rank(cp_group)
        log_atk_scale = log_atk_scale.chunk(world)[rank]
    full = [_seq_to_heads(t, cp_group) for t in (q, k, v, beta, g_atk, beta_atk)]
    g_full = None if g is None else _seq_to_heads(g, cp_group)
    o, _, _ = precond_delta_rule(*full, g_full, log_atk_scale=log_atk_scale, **kwargs)
    return _heads_to_seq(o, cp_group)
