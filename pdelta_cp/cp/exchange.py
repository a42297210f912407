"""Hand states across pieces of the stream: one all-gather of per-piece summaries, then a fold in stream order.

Each rank exports, for every piece it holds, the affine map from the state entering the piece to the state
leaving it (see :mod:`pdelta_cp.chunk.summary`). If a sequence starts inside the piece, the state leaving it
no longer depends on the entering one, and the export is (M = 0, b = that sequence's end state). After the
all-gather every rank walks the pieces in stream order,

    entering(piece) = initial state of its sequence   if the piece starts a sequence
                    = M_prev · entering(prev) + b_prev  otherwise,

and keeps the entering states of its own pieces. The backward of the all-gather (a reduce-scatter) returns
to each rank the gradient of its exported summaries: exactly the mirror of the forward.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..chunk.summary import AffineKind
from .comm import all_gather, tie
from .layout import StreamLayout


def pack(kind: AffineKind, M: Tensor, b: Tensor) -> Tensor:
    """(M, b) -> one tensor for one collective: dense [.., K, K+V]; diagonal [.., 2K]."""
    return torch.cat([M, b], dim=-1)


def unpack(kind: AffineKind, packed: Tensor) -> tuple[Tensor, Tensor]:
    K = packed.shape[-2] if kind.dense else packed.shape[-1] // 2
    return packed[..., :K], packed[..., K:]


def exchange_and_fold(
    layout: StreamLayout,
    group,
    kind: AffineKind,
    exports: tuple[Tensor, Tensor],
    initial: Callable[[int], Tensor],
    after: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Entering state of each local piece.

    exports: (M [P, ...], b [P, ...]) for the P local pieces, in the compute dtype.
    initial(seq): the initial state of sequence ``seq`` (zeros or the caller's initial state).
    after: the result of an earlier exchange that this one must follow in backward (see comm module).
    Returns the entering states (one per local piece) and the gathered payload [W, P, ...].
    """
    payload = tie(pack(kind, *exports), after)
    gathered = all_gather(payload, group)
    entering = fold_in_stream_order(layout, kind, gathered, initial)
    return [tie(state, gathered) for state in entering], gathered  # every rank joins the backward collective


def fold_in_stream_order(layout: StreamLayout, kind: AffineKind, gathered: Tensor,
                         initial: Callable[[int], Tensor]) -> list[Tensor]:
    """Walk all pieces in stream order applying the gathered maps [W, P, ...]; entering state of each local piece."""
    entering: list[Tensor | None] = [None] * len(layout.pieces)
    carried = None
    remaining = len(layout.pieces)
    for gp in layout.order:
        state = initial(gp.first_seq) if gp.starts_sequence else carried
        if gp.owner == layout.rank:
            entering[gp.index] = state
            remaining -= 1
            if remaining == 0:
                break
        M, b = unpack(kind, gathered[gp.owner, gp.index])
        carried = kind.apply(M, state) + b
    return entering
