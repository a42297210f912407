"""Short causal depthwise convolution (the layer's width-4 conv) with the context-parallel halo.

    y_t = act( sum_{i<W} weight[:, i] * x_{t-W+1+i} + bias )      (taps before the sequence start are zero)

With CP, the first W-1 taps of a piece reach back into earlier pieces, possibly several of them when pieces
are shorter than W-1, possibly on other ranks. Every rank contributes the last W-1 tokens of each of its
pieces to one all-gather; the backward (a reduce-scatter) returns the halo gradients to their owners.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cp.comm import agree, all_gather, signature, tie, world_and_rank
from .cp.layout import LAYOUTS, StreamLayout, pieces_per_sample, rank_pieces, stream_layout
from .indices import index_tensor
from .ops import _group_device

__all__ = ["short_conv"]

ACTIVATIONS = (None, "silu")


def _check(x, weight, bias, activation, cu_seqlens, world, cp_layout):
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor [B, T, D], got {getattr(x, 'shape', type(x).__name__)}")
    B, T, D = x.shape
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"weight must have shape [D, width] = [{D}, width], got {getattr(weight, 'shape', weight)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (D,)):
        raise ValueError(f"bias must be None or have shape [D] = [{D}], got {getattr(bias, 'shape', bias)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if cp_layout not in LAYOUTS:
        raise ValueError(f"cp_layout must be one of {LAYOUTS}, got {cp_layout!r}")
    cu = None
    if cu_seqlens is not None:
        cu = [int(c) for c in cu_seqlens.tolist()]
        if B != 1:
            raise ValueError(f"with cu_seqlens, B must be 1, got {B}")
        if cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])) or cu[-1] != T * world:
            raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at the total token count "
                             f"{T * world} (= {world} ranks x T = {T}), got {cu}")
    return B, T, D, cu


def _tap_index(layout: StreamLayout, width: int, L: int, device) -> Tensor:
    """[L, width] index of every tap into the table [x (L rows) | halo (P*(width-1) rows) | one zero row]."""
    E = width - 1
    zero_row = L + len(layout.pieces) * E
    piece_offsets, offset = [], 0
    for s, e in layout.pieces:
        piece_offsets.append(offset)
        offset += e - s
    segs = layout.segments

    def per_token(values) -> Tensor:
        sizes = [s.end - s.start for s in segs]  # output_size given: no device-to-host sync on CUDA
        return index_tensor(values, device).repeat_interleave(index_tensor(sizes, device), output_size=sum(sizes))

    seg_start = per_token([s.start for s in segs])
    piece = per_token([s.piece for s in segs])
    # earlier tokens of the same sequence that the halo may reach (only a piece's first segment has a halo)
    reach = per_token([
        (layout.pieces[s.piece][0] - layout.seq_bounds[s.seq][0]) if s.start == piece_offsets[s.piece] else 0
        for s in segs
    ])
    src = torch.arange(L, device=device)[:, None] - E + torch.arange(width, device=device)[None, :]
    back = seg_start[:, None] - src  # > 0: the tap lies before the token's segment
    halo_row = L + piece[:, None] * E + (E - back)
    return torch.where(back <= 0, src, torch.where(back <= reach[:, None], halo_row, zero_row))


def _gather_halos(layout: StreamLayout, x: Tensor, width: int, group) -> Tensor:
    """[P*(width-1), D]: the width-1 global tokens before each local piece (zeros where none/other ranks' padding)."""
    E = width - 1
    D = x.shape[-1]
    tails, offset = [], 0
    for s, e in layout.pieces:  # last E tokens of each piece, left-padded with zeros
        tail = x[offset + max(0, e - s - E): offset + (e - s)]
        tails.append(torch.cat([x.new_zeros(E - tail.shape[0], D), tail]))
        offset += e - s
    gathered = all_gather(torch.stack(tails), group)  # [W, P, E, D]
    halos = []
    for s, _ in layout.pieces:
        slots = []
        for d in range(E, 0, -1):  # tokens s-E .. s-1
            g = s - d
            owner = next((gp for gp in layout.order if gp.start <= g < gp.end), None)
            if owner is None:
                slots.append(x.new_zeros(D))
            else:
                slots.append(gathered[owner.owner, owner.index, g - owner.end + E])
        halos.append(torch.stack(slots) if slots else x.new_zeros(0, D))
    return tie(torch.cat(halos), gathered)


def short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    *,
    cu_seqlens: Tensor | None = None,
    cp_group=None,
    cp_layout: str = "contiguous",
) -> Tensor:
    """Causal depthwise conv over each sequence. x [B,T,D] (this rank's tokens), weight [D,W], bias [D] -> [B,T,D].

    Layout arguments as in :func:`pdelta_cp.precond_delta_rule`. Tokens of a different sequence never mix.
    """
    world, rank = world_and_rank(cp_group)
    error, sizes = None, None
    try:
        sizes = _check(x, weight, bias, activation, cu_seqlens, world, cp_layout)
        if sizes[1] % pieces_per_sample(cp_layout):
            raise ValueError(f"cp_layout={cp_layout!r} needs an even local length, got T={sizes[1]}")
        if cp_layout == "zigzag_per_sequence" and sizes[3] is not None:
            rank_pieces(world, 0, cp_layout, sizes[3][-1], sizes[3])  # every sequence a multiple of 2W
    except (ValueError, TypeError) as exc:
        error = exc
    grads = tuple(isinstance(t, Tensor) and t.requires_grad for t in (x, weight, bias)) + (torch.is_grad_enabled(),)
    sig = 0 if sizes is None else signature(sizes, tuple(weight.shape), bias is not None, activation, cp_layout,
                                            str(x.dtype), grads)
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    agree(error, sig, cp_group, _group_device(cp_group, device), "short_conv")
    B, T, D, cu = sizes
    width = weight.shape[1]
    layout = stream_layout(B, T, cu, world, rank, cp_layout)
    L = B * T
    xs = x.reshape(L, D)
    if world > 1:
        halo = _gather_halos(layout, xs, width, cp_group)
    else:  # one process: every piece starts a sequence, no halo
        halo = xs.new_zeros(len(layout.pieces) * (width - 1), D)
    table = torch.cat([xs, halo, xs.new_zeros(1, D)])
    y = _TapConv.apply(table, _tap_index(layout, width, L, x.device), weight, bias, activation == "silu")
    return y.reshape(B, T, D)


class _TapConv(torch.autograd.Function):
    """y [L, D] = act(sum_w table[index[:, w]] * weight[:, w] + bias), computed as autograd of that formula would
    (a gathered [L, width, D] tap tensor and one einsum, in the input's dtype), but keeping only ``table`` (the
    input with its halo rows) for backward: kept, the taps and the pre-activation are 5x the input per layer.
    Backward remakes the pre-activation (the taps live only for that einsum), then forms the gradients one
    [L, D] tap at a time in float32. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        ctx.save_for_backward(table, index, weight, bias)
        ctx.silu = silu
        pre = _pre_activation(table, index, weight, bias)
        return F.silu(pre) if silu else pre

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        table, index, weight, bias = ctx.saved_tensors
        d_pre = dy
        if ctx.silu:
            d_pre = torch.ops.aten.silu_backward(dy, _pre_activation(table, index, weight, bias))
        acc = torch.promote_types(table.dtype, torch.float32)
        d_pre = d_pre.to(acc)  # float32 products: no 16-bit rounding (or fp16 overflow) before the sums
        d_table = torch.zeros(table.shape, dtype=acc, device=table.device) if ctx.needs_input_grad[0] else None
        d_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[2] else None
        w32 = weight.to(table.dtype).to(acc)  # the forward used the weight in the input's dtype
        for w in range(weight.shape[1]):  # one [L, D] tap at a time: a [L, width, D] gradient would be the peak
            if d_weight is not None:
                d_weight[:, w] = (table[index[:, w]] * d_pre).sum(0)
            if d_table is not None:  # each table row feeds up to `width` taps: summed in float32
                d_table.index_add_(0, index[:, w], d_pre * w32[:, w])
        d_bias = d_pre.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        return (None if d_table is None else d_table.to(table.dtype), None,
                None if d_weight is None else d_weight.to(weight.dtype), d_bias, None)


def _pre_activation(table: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    pre = torch.einsum("lwd,dw->ld", table[index], weight.to(table.dtype))
    return pre if bias is None else pre + bias.to(table.dtype)
