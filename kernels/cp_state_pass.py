"""The state pass across ranks: the in-GPU segment parallelism of :mod:`.state_pass`, stretched over a CP group.

Inside one GPU a long segment is cut into sub-segments that run in parallel, joined by their affine maps
[M | b] (summary mode) and, in backward, by the transposed maps. Context parallelism is the same picture with
ranks: every rank summarises its pieces with the same summary kernel, the summaries are all-gathered once, and
each rank folds them in stream order to get the state entering its pieces.

Backward needs no gradient of any map. By linearity, the parameters' share of a piece's exported map, contracted
with the adjoint T arriving from the next piece, is exactly the local reverse pass with T added to the piece's
terminal adjoint — along the trajectory the forward already ran. So backward is:
  (a) a reverse pass from the local gradients only, giving ν = the adjoint at the start of every piece;
  (b) one all-gather of ν; a reverse fold in stream order, λ_j = ν_j + M_jᵀ T_j with T_j = λ of the next piece
      (0 when it starts a sequence): every rank now knows the adjoint T arriving at the end of its pieces;
  (c) the full reverse pass with T added to the terminal adjoints.
One collective per pass, [P, HV, K, K+V] forward and [P, HV, K, V] backward per rank, independent of T.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..cp.comm import all_gather_plain
from ..cp.exchange import fold_in_stream_order
from ..cp.layout import StreamLayout
from ..indices import put_rows, take_rows
from ..chunk.summary import DENSE
from .stages import GradHandoff, Recompute, grad_buffer, load_wy, save_states, save_wy
from .state_pass import _fold_backward, _fold_forward, _with_narrow_retry, arm_state_pass, arriving_state_grad, \
    last_subs, remake_starts, split_segments, state_backward, state_forward, states_dtype, zero_or_float


def _segment_maps(M_sub: Tensor, b_sub: Tensor, subs, seg: int) -> tuple[Tensor, Tensor]:
    """Compose the maps of segment ``seg``'s sub-segments in order."""
    maps = [(M_sub[i], b_sub[i]) for i, s in enumerate(subs) if s[2] == seg]
    return functools.reduce(DENSE.compose, maps)


class CPStatePass(torch.autograd.Function):
    """(W, U, P̃, d, initial states of all sequences [N, HV, K, V]) -> (state entering every local chunk,
    final state of every local segment, Δ or None: see state_pass.keeps_delta), for the rank's part of a stream
    split by ``layout``."""

    @staticmethod
    def forward(ctx, W, U, P, D, init_all, after, layout: StreamLayout, group, seg_first, seg_len, sub_len, narrow,
                recompute, handoff, dtype, keep_delta=False):
        ctx.set_materialize_grads(False)  # S's gradient may come through the handoff (see state_pass)
        K = W.shape[-1]
        subs = split_segments(seg_first, seg_len, sub_len)
        first, length = [s[0] for s in subs], [s[1] for s in subs]
        _, maps, _ = state_forward(W, U, P, D, None, first, length, summary=True, store_starts=False, narrow=narrow)
        M_sub, b_sub = maps[..., :K], maps[..., K:]
        segs = layout.segments
        exports = []
        for piece in range(len(layout.pieces)):
            last = layout.last_segment(piece)
            M, b = _segment_maps(M_sub, b_sub, subs, last)
            if last != layout.first_segment(piece):  # a sequence starts inside: export its end state
                M, b = torch.zeros_like(M), M @ init_all[segs[last].seq] + b
            exports.append(torch.cat([M, b], dim=-1))
        gathered = all_gather_plain(torch.stack(exports), group)  # [W, P, HV, K, K+V]
        entering = fold_in_stream_order(layout, DENSE, gathered, lambda seq: init_all[seq])
        S_enter = torch.stack([entering[s.piece] if _continues(layout, i) else init_all[s.seq]
                               for i, s in enumerate(segs)])
        S_sub = _fold_forward(M_sub, b_sub, S_enter, subs).contiguous()
        starts, finals, delta = state_forward(W, U, P, D, S_sub, first, length, narrow=narrow, starts_dtype=dtype,
                                              delta_dtype=dtype if keep_delta else None)
        last_sub = last_subs(subs)
        kept = save_states(ctx, recompute, starts, functools.partial(remake_starts, first, length, narrow, dtype),
                           S_sub)
        save_wy(ctx, recompute, (W, U, P), D, kept, M_sub, gathered[..., :K], delta)
        if recompute is not None:
            recompute.without_u(delta, K)
        ctx.meta = (layout, group, subs, last_sub, narrow, init_all.shape, handoff)
        arm_state_pass(handoff)
        if delta is not None:
            ctx.mark_non_differentiable(delta)
        return starts, take_rows(finals, last_sub), delta

    @staticmethod
    def backward(ctx, g_starts, g_final, g_delta=None):
        (W, U, P), (D, starts, M_sub, M_gathered, delta) = load_wy(ctx, states_at=1)
        layout, group, subs, last_sub, narrow, init_shape, handoff = ctx.meta
        first, length = [s[0] for s in subs], [s[1] for s in subs]
        segs = layout.segments
        HV, K, V = W.shape[1], W.shape[-1], starts.shape[-1]  # (U may be None: stages.Recompute.without_u)
        g_starts = zero_or_float(arriving_state_grad(handoff, g_starts), starts)
        terminal = grad_buffer(W, (len(subs), HV, K, V), zeros=True)
        if g_final is not None:
            put_rows(terminal, last_sub, g_final)
        # (a) adjoint at every sub-segment start from the local gradients only; ν at every piece start
        *_, local = state_backward(W, U, P, D, starts, g_starts, torch.zeros_like(terminal), first, length,
                                   store_grads=False, narrow=narrow)
        out = _fold_backward(M_sub, local, terminal, subs, last_sub)
        first_sub = {s[2]: i for i, s in reversed(list(enumerate(subs)))}
        nu = torch.stack([local[i] + M_sub[i].mT @ out[i]
                          for i in (first_sub[layout.first_segment(p)] for p in range(len(layout.pieces)))])
        # (b) one all-gather, reverse fold in stream order: the adjoint arriving at the end of each local piece
        arriving = _arriving_adjoints(layout, all_gather_plain(nu, group), M_gathered)
        for piece, T in enumerate(arriving):
            terminal[last_sub[layout.last_segment(piece)]] += T
        # (c) the full reverse pass
        out = _fold_backward(M_sub, local, terminal, subs, last_sub)
        dW, dU, dP, dD, dS0 = state_backward(W, U, P, D, starts, g_starts, out.contiguous(), first, length,
                                             narrow=narrow, reuse_g=handoff is not None,
                                             add_to=None if handoff is None else handoff.take("state_pass"),
                                             delta=delta)
        d_init = grad_buffer(W, init_shape, zeros=True)
        for i, s in enumerate(segs):  # states that entered from an initial state (own pieces' only: no double count)
            if not _continues(layout, i):
                d_init[s.seq] += dS0[first_sub[i]]
        return dW, dU, dP, dD, d_init, None, None, None, None, None, None, None, None, None, None, None


def _continues(layout: StreamLayout, seg: int) -> bool:
    """Does segment ``seg`` take its entering state from the previous piece (not from an initial state)?"""
    s = layout.segments[seg]
    return seg == layout.first_segment(s.piece) and not s.starts_sequence


def _arriving_adjoints(layout: StreamLayout, nu_gathered: Tensor, M_gathered: Tensor) -> list[Tensor]:
    """Reverse fold over all pieces: λ_j = ν_j + M_jᵀ T_j, T_j = λ of the next piece unless it starts a sequence.
    Returns T for each local piece."""
    arriving: list[Tensor | None] = [None] * len(layout.pieces)
    nxt = None  # (λ, starts_sequence) of the piece after the current one in stream order
    for gp in reversed(layout.order):
        T = torch.zeros_like(nu_gathered[0, 0]) if nxt is None or nxt[1] else nxt[0]
        if gp.owner == layout.rank:
            arriving[gp.index] = T
        lam = nu_gathered[gp.owner, gp.index] + M_gathered[gp.owner, gp.index].mT @ T
        nxt = (lam, gp.starts_sequence)
    return arriving


def cp_state_pass(W: Tensor, U: Tensor, P: Tensor, D: Tensor, init_all: Tensor, layout: StreamLayout, group,
                  seg_first, seg_len, sub_len: int, after: Tensor | None = None,
                  recompute: Recompute | None = None, handoff: GradHandoff | None = None,
                  input_dtype: torch.dtype = torch.float32,
                  keep_delta: bool = False) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """W, P [Nc,HV,C,K]; U [Nc,HV,C,V]; D [Nc,HV,K]; init_all [N,HV,K,V] (float32) -> (starts, finals, Δ or None),
    or None when the kernels do not fit this GPU (the caller then uses the PyTorch exchange). ``after``: the A
    exchange's gathered tensor, so that backward meets this pass's collective before that one's (see cp.comm).
    ``handoff``, ``input_dtype`` and ``keep_delta`` as in :func:`.state_pass.state_pass`."""
    args = [t.contiguous() for t in (W, U, P, D, init_all)]
    dtype = states_dtype(handoff, input_dtype)
    return _with_narrow_retry(lambda narrow: CPStatePass.apply(*args, after, layout, group, tuple(seg_first),
                                                               tuple(seg_len), sub_len, narrow, recompute,
                                                               handoff, dtype, keep_delta))
