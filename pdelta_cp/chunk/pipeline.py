"""The chunkwise PyTorch path of the op, for one rank (or one process), with its two state hand-offs.

Order of work (docs/algorithm.md §3):
  1. preconditioner chunk maps -> per-piece summaries -> exchange + fold -> A entering every segment
  2. A at every token -> write keys p (depend on the incoming A: that is why A goes first)
  3. WY/UT chunk quantities -> per-piece state summaries -> exchange + fold -> S entering every segment
  4. chunk-by-chunk state pass and outputs
Per-piece summaries compose the chunk maps with a log-depth tree (no chain over the rank's chunks).
Autograd differentiates the whole path, collectives included (see :mod:`pdelta_cp.cp.comm`).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cp.exchange import exchange_and_fold
from ..cp.layout import StreamLayout
from ..indices import index_tensor
from .delta import DeltaChunks, delta_chunks
from .plan import ChunkPlan, diagonal_scan, make_chunk_plan, scan_chunks
from .preconditioner import _WeightedSquares, preconditioner_chunks, write_keys
from .summary import DENSE, DIAGONAL, AffineKind

CHUNK_SIZE = 64


@dataclass
class StreamInputs:
    """One rank's tokens as a flat stream, in the caller's dtypes (converted to ``dtype`` once, in chunk layout).

    q, k [L, H, K] (raw: normalised and scaled here when ``qk_l2norm``; q is always multiplied by ``q_scale``);
    v [L, HV, V]; beta [L, HV]; g_atk, beta_atk [L, H]; g None | [L, HV] | [L, HV, K]; centre [H];
    initial_state [N, HV, K, V] | None; initial_A_state [N, H, K] | None; dtype: float32 or float64.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g_atk: Tensor
    beta_atk: Tensor
    g: Tensor | None
    centre: Tensor
    x: float
    eps: float
    initial_state: Tensor | None
    initial_A_state: Tensor | None
    dtype: torch.dtype = torch.float32
    qk_l2norm: bool = True
    q_scale: float = 1.0


@dataclass
class StreamOutputs:
    o: Tensor  # [L, HV, V] in v's dtype
    final_S: Tensor  # [Nseg, HV, K, V] state leaving each local segment
    final_A: Tensor  # [Nseg, H, K]


def _heads_first(plan: ChunkPlan, x: Tensor, dtype: torch.dtype) -> Tensor:
    """[L, heads, *rest] -> [Nc, heads, C, *rest] in ``dtype``, contiguous: one copy (the gather is a view when
    the plan has no padding), shared by every consumer and by what they save for backward."""
    if plan.dense and x.dim() >= 2:
        return _DenseRelayout.apply(x, True, plan.chunk_size, dtype)
    return plan.gather(x).movedim(1, 2).to(dtype=dtype, memory_format=torch.contiguous_format)


def _tokens_first(plan: ChunkPlan, xc: Tensor, dtype: torch.dtype) -> Tensor:
    """[Nc, heads, C, *rest] -> [L, heads, *rest] in ``dtype`` (the inverse of :func:`_heads_first`): one copy."""
    if plan.dense:
        return _DenseRelayout.apply(xc, False, plan.chunk_size, dtype)
    return plan.scatter(xc.movedim(2, 1)).to(dtype)


class _DenseRelayout(torch.autograd.Function):
    """Between the stream layout [L, heads, *rest] and the chunk layout [Nc, heads, C, *rest] of a plan without
    padding (L = Nc·C), with a dtype change, in one copy each way (autograd of the plain form casts, then copies:
    two passes over every tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, to_chunks: bool, chunk_size: int, dtype: torch.dtype) -> Tensor:
        ctx.to_chunks, ctx.chunk_size, ctx.x_dtype = to_chunks, chunk_size, x.dtype
        return _relayout(x, to_chunks, chunk_size, dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _relayout(g, not ctx.to_chunks, ctx.chunk_size, ctx.x_dtype), None, None, None


def _relayout(x: Tensor, to_chunks: bool, C: int, dtype: torch.dtype) -> Tensor:
    if to_chunks:  # [L, h, *r] -> [Nc, h, C, *r]
        L, h, *rest = x.shape
        out = x.new_empty((L // C, h, C, *rest), dtype=dtype)
        out.movedim(1, 2).copy_(x.reshape(L // C, C, h, *rest))
    else:  # [Nc, h, C, *r] -> [L, h, *r]
        Nc, h, _, *rest = x.shape
        out = x.new_empty((Nc * C, h, *rest), dtype=dtype)
        out.view(Nc, C, h, *rest).copy_(x.movedim(1, 2))
    return out


class _L2Normalize(torch.autograd.Function):
    """y = scale · x / sqrt(|x|² + 1e-6) over the last dim; saves y and the inverse norm (not x)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        r = torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
        y = x * (r * scale)
        ctx.save_for_backward(y, r)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, r = ctx.saved_tensors
        s = ctx.scale
        return r * (s * dy - y * ((y * dy).sum(-1, keepdim=True) / s)), None


@dataclass(frozen=True)
class _Forms:
    """A backend's functions for the steps before the delta stage (the Triton kernels or their PyTorch forms)."""

    normalize: Callable  # (x [..., K], scale) -> scale · x / |x|
    normalize_to_chunks: Callable | None  # (x [L,H,K], scale, C, starts, lens) -> [Nc,H,C,K] f32; None: relayout first
    weighted_squares: Callable  # (w [Nc,H,C], k [Nc,H,C,K]) -> Σ_c w_c k_c² [Nc,H,K]
    write_keys: Callable  # see chunk.preconditioner.write_keys
    diagonal_scan: Callable  # see chunk.plan.diagonal_scan


def _grad_handoff(backend: str):
    """The Triton stages' gradient handoff (kernels.stages.GradHandoff) for one call, or None: the torch backend,
    no autograd, or PDELTA_GRAD_HANDOFF=0 (autograd sums every gradient)."""
    if backend != "triton" or not torch.is_grad_enabled() or os.environ.get("PDELTA_GRAD_HANDOFF", "1") == "0":
        return None
    from ..kernels.stages import GradHandoff

    return GradHandoff()


def _forms(backend: str, handoff=None) -> _Forms:
    """The steps before the delta stage; the Triton ones share ``handoff`` (K̂'s gradients summed in-kernel)."""
    if backend == "triton":
        from ..kernels.l2norm import l2_normalize_to_chunks_triton, l2_normalize_triton
        from ..kernels.precond_summary import weighted_squares_triton
        from ..kernels.diagonal_scan import diagonal_scan_triton
        from ..kernels.preconditioner import write_keys_triton

        return _Forms(l2_normalize_triton, l2_normalize_to_chunks_triton,
                      functools.partial(weighted_squares_triton, handoff=handoff),
                      functools.partial(write_keys_triton, handoff=handoff), diagonal_scan_triton)
    return _Forms(_L2Normalize.apply, None, _WeightedSquares.apply, write_keys, diagonal_scan)


def _stream_layout(plan: ChunkPlan, backend: str) -> bool:
    """Whether the kernels read q, k, v and write o (and their gradients) in the stream layout: with the Triton
    backend always, unless a segment's last chunk is padded and PDELTA_STREAM_PADDED=0 (then the padded plan's
    tensors go through relayout copies, as before session k: a switch for bisecting)."""
    return backend == "triton" and (plan.dense or os.environ.get("PDELTA_STREAM_PADDED", "1") != "0")


def _normalised(plan: ChunkPlan, inp: StreamInputs, forms: _Forms, stream: bool, x: Tensor, scale: float) -> Tensor:
    """q̂ (x = q, scale = q_scale) or k̂ (x = k, scale 1) [Nc, H, C, K] in the compute dtype (normalised in chunk
    layout: padding rows stay zero)."""
    if stream and inp.qk_l2norm and forms.normalize_to_chunks is not None and inp.dtype == torch.float32:
        # the kernels read the stream layout and write the chunk layout: no relayout copy, no cast, either way
        rows = (plan.chunk_size,) if plan.dense else (plan.chunk_size, plan.chunk_start, plan.chunk_len)
        return forms.normalize_to_chunks(x, scale, *rows)
    x = _heads_first(plan, x, inp.dtype)
    return forms.normalize(x, scale) if inp.qk_l2norm else x * scale if scale != 1.0 else x


def _initial(init: Tensor | None, shape, like: Tensor) -> Callable[[int], Tensor]:
    if init is None:
        zero = like.new_zeros(shape)
        return lambda seq: zero
    return lambda seq: init[seq]


def _entering_states(
    layout: StreamLayout,
    group,
    plan: ChunkPlan,
    kind: AffineKind,
    chunk_maps: Callable[[slice], tuple[Tensor, Tensor]],
    initial: Callable[[int], Tensor],
    after: Tensor | None,
    initial_states: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """State entering every local segment [Nseg, ...], and the gathered payload (None for one process)."""
    segs = layout.segments
    if layout.world == 1:  # every piece starts a sequence: nothing to hand over
        if initial_states is None:
            return initial(0).expand((len(segs),) + initial(0).shape), None
        return initial_states.index_select(0, index_tensor([s.seq for s in segs], initial_states.device)), None
    exports_M, exports_b = [], []
    for piece in range(len(layout.pieces)):
        last = layout.last_segment(piece)
        M, b = kind.reduce(*chunk_maps(plan.chunks_of(last)))
        if last != layout.first_segment(piece):  # a sequence starts inside the piece: export its end state
            M, b = torch.zeros_like(M), kind.apply(M, initial(segs[last].seq)) + b
        exports_M.append(M)
        exports_b.append(b)
    entering, gathered = exchange_and_fold(
        layout, group, kind, (torch.stack(exports_M), torch.stack(exports_b)), initial, after
    )
    first_of_piece = {layout.first_segment(p) for p in range(len(layout.pieces))}
    states = [entering[s.piece] if i in first_of_piece else initial(s.seq) for i, s in enumerate(segs)]
    return torch.stack(states), gathered


def _log_decays_again(plan: ChunkPlan, dtype: torch.dtype, g_stream: Tensor) -> Tensor:
    """Per-channel Γ = cumsum of g within each chunk, from the op's g [L, HV, K], made as the forward makes it (for
    kernels.remade: backward remakes Γ instead of keeping it; ``plan`` is the cached chunk plan)."""
    return _heads_first(plan, g_stream, dtype).cumsum(-2)


class _DeltaStage:
    """Steps 3-4 for one backend: chunk quantities (with their affine maps for CP) and the state pass + outputs.

    torch: the PyTorch chunk form and a chunk-by-chunk loop. triton: Triton WY/UT, state-pass and output
    kernels (scalar decay for PDN/PGDN, per-channel decay for PKDA).
    Inputs are chunk tensors: k_hat, p [Nc,H,C,K]; v [Nc,HV,C,V]; beta [Nc,HV,C]; g None|[Nc,HV,C]|[..,K]; and
    ``queries()``, which makes q̂ [Nc,H,C,K] (called where q̂ is first read); ``g_stream``: the op's g, from which
    backward remakes the per-channel Γ (kernels.remade).
    """

    def __init__(self, plan: ChunkPlan, queries: Callable[[], Tensor], k_hat, p, v, beta, g, backend: str, handoff=None,
                 out_dtype: torch.dtype = torch.float32, g_stream: Tensor | None = None):
        self.plan, self.backend, self.out_dtype = plan, backend, out_dtype
        HV, H = v.shape[1], k_hat.shape[1]  # v: [Nc, HV, C, V], or [L, HV, V] for the kernels (see _stream_layout)
        if backend == "triton":
            self.per_channel = g is not None and g.dim() == 4
            if self.per_channel:
                from ..kernels.channel import wy_channel_decay as wy
            else:
                from ..kernels.wy import wy_scalar_decay as wy
            if g is None:
                self.gamma = torch.zeros_like(beta)
            else:
                self.gamma = g.cumsum(-2) if self.per_channel else g.cumsum(-1)
            if self.per_channel and g_stream is not None:  # Γ [Nc, HV, C, K] float32: remade from the op's g
                from ..kernels import remade

                remade.register(self.gamma, functools.partial(_log_decays_again, plan, g.dtype), g_stream)
            from ..kernels.stages import Recompute, StreamRows, remade_wy_dtype

            # the output stage's gradients of W, U and P go to the state pass's and the WY stage's backward, which
            # add their own in-kernel (no autograd sums); None (PDELTA_GRAD_HANDOFF=0) leaves the sums to autograd
            self.handoff = handoff
            # q, k, v, o and their gradients stay in the stream layout: the kernels find each chunk's tokens
            stream = v.dim() == 3  # V as it comes (see _stream_layout), or relaid out
            self.rows = StreamRows(plan.chunk_start, plan.chunk_len, plan.num_tokens, plan.dense) if stream else None
            W, U, p_tilde, d, T = wy(k_hat, p, v, beta, self.gamma, self.handoff, with_inverse=True, rows=self.rows)
            # backward remakes W, U, P̃ with one WY launch instead of keeping them (as fla does for w, u);
            # PDELTA_KEEP_WY=1 keeps them: a faster backward for more memory
            keep = os.environ.get("PDELTA_KEEP_WY") == "1" or not torch.is_grad_enabled()
            # PDELTA_RECOMPUTE_STATES=1: the chunk states are remade in backward too (one more state-pass launch)
            states = os.environ.get("PDELTA_RECOMPUTE_STATES") == "1"
            # the remake reads the inverse T the WY stage keeps for its own backward anyway, skipping the Gram and
            # the triangular solve (bitwise the same W, U, P̃; H100 session j: PKDA −10%, PGDN −3% fwd+bwd at 32K);
            # PDELTA_REMAKE_FROM_INVERSE=0 redoes the whole WY forward
            from_inverse = T is not None and os.environ.get("PDELTA_REMAKE_FROM_INVERSE", "1") != "0"
            if keep:
                self.recompute = None
            elif from_inverse:
                # PDELTA_REMAKE_WY_BF16=1: remade in bfloat16 for 16-bit inputs (stages.remade_wy_dtype)
                wy_dtype = remade_wy_dtype(out_dtype, states)
                # (U left out of the remake where backward reads the kept Δ instead: Recompute.without_u)
                self.recompute = Recompute(functools.partial(wy.remake, rows=self.rows, wy_dtype=wy_dtype), k_hat, p,
                                           v, beta, self.gamma, T, states=states, u_optional=True)
            else:
                self.recompute = Recompute(functools.partial(wy, rows=self.rows), k_hat, p, v, beta, self.gamma,
                                           states=states)
            self.queries, self.p = queries, p
            decay = d if self.per_channel else d[..., None]
            self.chunks = DeltaChunks(q_decayed=None, qp=None, W=W, U=U, p_tilde=p_tilde, decay=decay)
        else:
            def per_value_head(t: Tensor) -> Tensor:
                return t.repeat_interleave(HV // H, dim=1) if HV > H else t

            self.chunks = delta_chunks(per_value_head(queries()), per_value_head(k_hat), per_value_head(p), v, beta, g)

    def maps(self, ids):
        return self.chunks.maps(ids)

    def run(self, S_enter: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs in the stream layout [L, HV, V] and ``out_dtype``, and the state leaving every segment."""
        ch, plan = self.chunks, self.plan
        if self.backend == "torch":
            S_start, S_final = scan_chunks(plan, S_enter, ch.step)
            return _tokens_first(plan, ch.output(S_start), self.out_dtype), S_final
        from ..kernels.state_pass import keeps_delta, state_pass

        S_start, S_final, delta = state_pass(*self._kernel_chunks(), S_enter, plan.seg_first_chunk,
                                             plan.seg_num_chunks, recompute=self.recompute, handoff=self.handoff,
                                             input_dtype=self.out_dtype, keep_delta=keeps_delta(self.recompute))
        return self._kernel_outputs(S_start, delta), S_final

    def run_across_ranks(self, layout: StreamLayout, group, init_all: Tensor, after: Tensor | None):
        """Triton only: the state hand-off between ranks and the pass in one (kernels.cp_state_pass); returns
        (outputs, final states) like :meth:`run`, or None when its kernels do not fit this GPU."""
        from ..kernels.cp_state_pass import cp_state_pass
        from ..kernels.state_pass import default_sub_len, keeps_delta

        plan = self.plan
        W = self.chunks.W
        sub_len = default_sub_len(plan.seg_num_chunks, W.shape[1], self.chunks.U.shape[-1], W.device,
                                  summaries_needed=True)
        out = cp_state_pass(*self._kernel_chunks(), init_all, layout, group, plan.seg_first_chunk,
                            plan.seg_num_chunks, sub_len, after, self.recompute, handoff=self.handoff,
                            input_dtype=self.out_dtype, keep_delta=keeps_delta(self.recompute))
        return None if out is None else (self._kernel_outputs(out[0], out[2]), out[1])

    def _kernel_chunks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ch = self.chunks
        K = ch.W.shape[-1]
        return ch.W, ch.U, ch.p_tilde, ch.decay.expand(*ch.decay.shape[:-1], K)

    def _kernel_outputs(self, S_start: Tensor, delta: Tensor | None = None) -> Tensor:
        if self.per_channel:
            from ..kernels.channel import output_channel_decay as output
        else:
            from ..kernels.output import output_scalar_decay as output
        # the kernels write O in the stream layout and dtype themselves (and read dO so)
        o = output(self.queries(), self.p, self.gamma, self.chunks.W, self.chunks.U, S_start, self.recompute,
                   self.handoff, self.rows, self.out_dtype, delta)
        return o if self.rows is not None else _tokens_first(self.plan, o, self.out_dtype)


def chunked_precond_delta_rule(inp: StreamInputs, layout: StreamLayout, group, backend: str = "torch") -> StreamOutputs:
    H, K = inp.k.shape[1:]
    HV, V = inp.v.shape[1:]
    dt = inp.dtype
    plan = make_chunk_plan([(s.start, s.end) for s in layout.segments], layout.num_tokens, CHUNK_SIZE,
                           inp.v.device)

    # 1. preconditioner state entering every segment
    handoff = _grad_handoff(backend)
    forms = _forms(backend, handoff)
    stream = _stream_layout(plan, backend)
    k_hat = _normalised(plan, inp, forms, stream, inp.k, 1.0)  # [Nc, H, C, K]
    # q̂ is made where it is first read (the output stage on the kernel path): its normalisation's backward then
    # runs right after the output stage's (autograd runs the latest-made ready node first), and q̂'s float32
    # gradient is not alive through the state pass's backward
    queries = functools.partial(_normalised, plan, inp, forms, stream, inp.q, inp.q_scale)
    g_atk, beta_atk = _heads_first(plan, inp.g_atk, dt), _heads_first(plan, inp.beta_atk, dt)
    pre = preconditioner_chunks(k_hat, g_atk, beta_atk, forms.weighted_squares)
    A_init = _initial(inp.initial_A_state, (H, K), k_hat)
    A_enter, A_gathered = _entering_states(layout, group, plan, DIAGONAL, lambda ids: (pre.decay[ids], pre.end[ids]),
                                           A_init, None, inp.initial_A_state)
    A_start, A_final = forms.diagonal_scan(plan, A_enter, pre.decay, pre.end)

    # 2. write keys
    p = forms.write_keys(k_hat, g_atk, beta_atk, A_start, inp.centre, inp.x, inp.eps)

    # 3. WY/UT chunk quantities, state entering every segment
    g = None if inp.g is None else _heads_first(plan, inp.g, dt)
    # the kernels read V as it comes, in the stream layout [L, HV, V] and its own dtype (and write dV there): no
    # relayout copy, no float32 copy
    if stream:
        v = inp.v.contiguous()
    else:  # the kernels keep 16-bit V as it is (no float32 copy)
        v = _heads_first(plan, inp.v, inp.v.dtype if backend == "triton" else dt)
    stage = _DeltaStage(plan, queries, k_hat, p, v, _heads_first(plan, inp.beta, dt), g, backend, handoff, inp.v.dtype,
                        g_stream=inp.g)
    result = None
    # 3-4 at once under CP with the kernels: kernel summaries, one exchange, adjoint mirror (kernels.cp_state_pass);
    # PDELTA_CP_TREE=1 forces the PyTorch exchange below (autograd through a tree of dense maps), for bisecting
    if backend == "triton" and layout.world > 1 and os.environ.get("PDELTA_CP_TREE") != "1":
        init_all = inp.initial_state
        if init_all is None:
            init_all = k_hat.new_zeros((layout.num_sequences, HV, K, V))
        result = stage.run_across_ranks(layout, group, init_all, A_gathered)
    if result is None:
        S_init = _initial(inp.initial_state, (HV, K, V), k_hat)
        S_enter, _ = _entering_states(layout, group, plan, DENSE, stage.maps, S_init, A_gathered,
                                      inp.initial_state)
        # 4. state pass and outputs
        result = stage.run(S_enter)
    o, S_final = result
    return StreamOutputs(o=o, final_S=S_final, final_A=A_final)
