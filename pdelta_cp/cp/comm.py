"""Collectives with the autograd rules that context parallelism needs.

Every function takes a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU) or ``None`` for a
single process, in which case it is the identity (no communication).

Backward collectives run in the order autograd reaches them, and every rank must reach the same ones in
the same order. Two rules keep that true: (1) every rank's outputs depend on every gathered tensor (see
:func:`tie`), so each rank runs each backward collective; (2) a later exchange's payload is tied to the
earlier exchange's result, so backward meets them in exactly the reverse of the forward order.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor


# torch >= 2.12 renamed the flat-tensor collectives; older releases (e.g. 2.11 on the GPU image) lack the new names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world_and_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_plain(x: Tensor, group) -> Tensor:
    """[*S] on each rank -> [W, *S] everywhere, outside autograd (for Functions with their own backward)."""
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())  # flat buffers: gloo splits the output along dim 0
    _all_gather_flat(out, x.reshape(-1).contiguous(), group=group)
    return out.view((world,) + x.shape)


class _AllGather(torch.autograd.Function):
    """[*S] on each rank -> [W, *S] everywhere; backward: each rank gets the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return all_gather_plain(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty(grad[0].numel())
        _reduce_scatter_flat(out, grad.reshape(-1).contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out.view(grad.shape[1:]), None


def all_gather(x: Tensor, group) -> Tensor:
    """Differentiable all-gather: returns [W, *x.shape] (W = 1 without a group)."""
    if group is None:
        return x.unsqueeze(0)
    return _AllGather.apply(x, group)


class _ReplicateSum(torch.autograd.Function):
    """Forward: all-reduce (sum). Backward: identity.

    For outputs assembled from per-rank parts (each rank fills the rows it owns): every rank then holds the
    full tensor and a loss term computed from it identically on every rank is counted once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def replicate_sum(x: Tensor, group) -> Tensor:
    if group is None:
        return x
    return _ReplicateSum.apply(x, group)


class _Tie(torch.autograd.Function):
    """Returns ``x`` unchanged; makes it depend on ``others`` (zero gradient) to order backward collectives."""

    @staticmethod
    def forward(ctx, x: Tensor, *others: Tensor) -> Tensor:
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes)


def tie(x: Tensor, *others: Tensor) -> Tensor:
    others = tuple(o for o in others if o is not None and o.requires_grad)
    if not others or not torch.is_grad_enabled():
        return x
    return _Tie.apply(x, *others)


def signature(*items) -> int:
    """A process-independent 63-bit digest of ``items`` (Python's ``hash`` is salted per process)."""
    return zlib.crc32(repr(items).encode()) & 0x7FFFFFFF


def agree(error: Exception | None, sig: int, group, device, what: str) -> None:
    """Make every rank of ``group`` fail together, before any other collective, if any rank failed.

    Each rank contributes (failed?, signature of its arguments). A rank that failed re-raises its own error;
    the others raise an error naming the failed ranks. Ranks whose arguments disagree all raise.
    """
    if group is None:
        if error is not None:
            raise error
        return
    world, rank = world_and_rank(group)
    mine = torch.empty(2, dtype=torch.int64, device=device)  # filled in place: torch.tensor(list) on a GPU
    mine[0], mine[1] = (1 if error is not None else 0), sig  # would wait for the stream (a second sync)
    everyone = torch.empty(world * 2, dtype=torch.int64, device=device)
    _all_gather_flat(everyone, mine, group=group)
    rows = everyone.view(world, 2).tolist()  # one device-to-host copy (a GPU sync) for all ranks' entries
    failed = [r for r, (flag, _) in enumerate(rows) if flag != 0]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what}: CP rank(s) {failed} of {world} rejected their arguments (see their error); "
                           f"rank {rank} stops too so that no rank waits in a collective.")
    sigs = [sig for _, sig in rows]
    if len(set(sigs)) > 1:
        raise ValueError(f"{what}: the CP ranks were called with different shapes, dtypes, options or "
                         f"requires_grad settings (argument digests per rank: {sigs}); every rank of cp_group "
                         f"must pass its own equal-sized share of the same call.")
