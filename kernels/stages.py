"""The autograd wrappers shared by the chunk-stage kernels (scalar and per-channel decay).

Each stage is a forward kernel plus backward kernel(s) and its PyTorch form. The wrapper launches the
kernels, falls back to the PyTorch form (forward, or its autograd for the backward) when a kernel does not
fit the GPU, and folds grouped value heads back onto their key heads.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import remade
from ._triton_utils import chunk_tile_config, dot_precision, exact_in_bf16, launch_config, launch_or_fallback

C = 64


def torch_form_grads(torch_form: Callable, saved, grads):
    """Backward through PyTorch autograd of the stage's PyTorch form."""
    inputs = [t.detach().requires_grad_(True) for t in saved]
    with torch.enable_grad():
        outs = torch_form(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        if not pairs:  # no gradient arrived (a stage may receive none, see GradHandoff's "states")
            return (None,) * len(inputs)
        return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


class Recompute:
    """Gives the WY stage's outputs (W, U, P̃, d) again in backward — one forward launch, cached — so the stages
    that consume them need not keep them from forward to backward (as fla recomputes w, u).

    The inputs reach backward only through each stage's ``save_for_backward`` (:func:`save_wy`), never as an
    attribute of ``ctx``: activation checkpointing drops saved tensors after forward and remakes them in
    backward, but anything held on ``ctx`` stays alive for every layer (14 KB per token per layer at the 340M
    shape, which made 1M-token training run out of memory). ``cache`` holds no tensor until backward.
    """

    def __init__(self, fn: Callable, *inputs: torch.Tensor, states: bool = False, u_optional: bool = False):
        self.inputs = tuple(remade.detached(t) for t in inputs)
        # ``u_optional``: fn takes ``with_u`` (the remake from the inverse); see :meth:`without_u`. The cache lives
        # on in the stages' ctx after this object is gone: it shares the flag, not this object (which holds inputs)
        self._u_needed = needed = [True]
        self.cache = remade.RemadeOnce((lambda *t: fn(*t, with_u=needed[0])) if u_optional else fn)
        self.u_optional = u_optional
        self.states = _States(self.cache) if states else None

    @property
    def u_needed(self) -> bool:
        return self._u_needed[0]

    def without_u(self, delta: torch.Tensor | None, K: int) -> None:
        """Called by the state pass's forward: where it kept Δ = U − W S (``delta``) and its reverse pass is the
        split one (K <= 128), no reader in backward takes U — the output stage's dQ̂/dP kernel and the chunk-gradient
        kernel read Δ, the dS and reverse-pass kernels never read U — so the remake need not write U
        [Nc, HV, C, V] (256 B per token and head in bfloat16, alive at the backward's peak) and gives None in its
        place; a fallback that needs U after all forms it again as Δ + W S (:func:`u_again`). The output stage's
        forward calls :meth:`keep_u` if it ran in PyTorch (its backward then needs U). PDELTA_REMAKE_U=1 keeps U."""
        from .state_pass import split_backward_enabled  # (state_pass imports this module)

        if self.u_optional and delta is not None and split_backward_enabled(K) \
                and os.environ.get("PDELTA_REMAKE_U") != "1":
            self._u_needed[0] = False

    def keep_u(self) -> None:
        self._u_needed[0] = True


def u_again(U: torch.Tensor | None, W: torch.Tensor, S: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """U for a path that reads it: U itself, or — where the remake left it out (:meth:`Recompute.without_u`) —
    Δ + W S in float32 from the kept Δ [Nc, HV, C, V], W [Nc, HV, C, K] and the chunk states S [Nc, HV, K, V]."""
    if U is not None:
        return U
    if delta is None:
        raise RuntimeError("the WY remake left U out but no Δ was kept to form it again from: this is a bug")
    return delta.float() + W.float() @ S.float()


class _States:
    """With ``Recompute(..., states=True)``: the chunk-entering states S [Nc, HV, K, V] are not kept for backward
    either (1 KB per token and head in float32, the largest saved tensor). The state pass saves the small
    per-sub-segment entering states instead and hands them to the output stage; in backward one state-pass
    forward launch remakes S from them and the remade WY outputs, once for both stages (as fla remakes its h)."""

    def __init__(self, wy_cache: remade.RemadeOnce):
        self.wy_cache = wy_cache
        self.cache = remade.RemadeOnce(self._remake)
        self.remake_starts: Callable | None = None  # (W, U, P̃, d, S_sub) -> S, set by the state pass
        self.pending: torch.Tensor | None = None  # S_sub, from the state pass's forward to the output stage's

    def _remake(self, *inputs):
        W, U, P_t, d = self.wy_cache(lambda: inputs[:-1])
        return (self.remake_starts(W, U, P_t, d, inputs[-1]),)

    def give(self, remake_starts: Callable, S_sub: torch.Tensor) -> torch.Tensor:
        """State pass forward: S_sub is what it saves for S from now on (and what the output stage will save)."""
        self.remake_starts, self.pending = remake_starts, S_sub
        self.wy_cache.register()  # the remake reads the WY outputs once more
        self.cache.register()
        return S_sub

    def take(self, S: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Output stage forward: (what to save for S, whether it is S_sub). S itself when the state pass did not
        give S_sub (its PyTorch fallback ran)."""
        S_sub, self.pending = self.pending, None
        if S_sub is None:
            return S, False
        self.cache.register()
        return S_sub, True


def save_states(ctx, recompute: Recompute | None, S: torch.Tensor, remake_starts: Callable | None = None,
                S_sub: torch.Tensor | None = None) -> torch.Tensor:
    """What a stage saves for the chunk states S: S, or S_sub when the states are remade in backward. The state
    pass passes ``remake_starts`` and ``S_sub``; the output stage passes S alone. Read back with
    :func:`load_wy` with ``states_at`` (the position of what this returned among the saved ``others``)."""
    states = None if recompute is None else recompute.states
    if states is not None and remake_starts is not None:
        ctx.states = states
        return states.give(remake_starts, S_sub)
    if states is not None:
        saved, from_sub = states.take(S)
        ctx.states = states if from_sub else None
        return saved
    ctx.states = None
    return S


def adjoint_dtype(S: torch.Tensor) -> torch.dtype:
    """Storage of the chunk-state-sized gradients — dS from the output stage and the adjoints Λ the reverse pass
    keeps for the chunk-gradient kernel (written over dS): bfloat16 where the states S themselves are bfloat16 (as
    fla keeps dh in the inputs' dtype), else float32; PDELTA_ADJOINTS_BF16=0 keeps float32. The reverse pass
    carries Λ in float32; only the stored copies are rounded. Halves the largest float32 tensor of the backward
    (1 KB per token and head at K = V = 128) and its traffic: H100 session o, PGDN 32K fwd+bwd −2.1%, peak
    −0.25 GiB, tests/test_gpu.py within its limits. Default since session o."""
    on = os.environ.get("PDELTA_ADJOINTS_BF16", "1") == "1"
    return torch.bfloat16 if on and S.dtype == torch.bfloat16 else torch.float32


def grad_buffer(like: torch.Tensor, shape, zeros: bool = False) -> torch.Tensor:
    """A float32 buffer on ``like``'s device: gradients (and float32 partials) stay float32 whatever the storage of
    the tensor they belong to (W, U, P̃ may be remade in bfloat16, see :func:`remade_wy_dtype`)."""
    return like.new_zeros(shape, dtype=torch.float32) if zeros else like.new_empty(shape, dtype=torch.float32)


def remade_wy_dtype(input_dtype: torch.dtype, states_remade: bool) -> torch.dtype:
    """Storage of W, U, P̃ as backward remakes them (:class:`Recompute` from the inverse): bfloat16 for 16-bit
    inputs — as fla remakes w, u in the inputs' dtype — else float32; PDELTA_REMAKE_WY_BF16=0 keeps float32. Only
    backward reads them (the output and state-pass gradients; the forward keeps its float32 tensors), so the
    outputs are unchanged and the gradients are those of the forward up to the rounding of W, U, P̃. Never when
    the chunk states are remade from them too (PDELTA_RECOMPUTE_STATES=1: the states would drift from the
    forward's). Halves the three largest remade tensors (1.5 KB per token and head at K = 128) and their reads in
    the backward kernels: H100 session o, PGDN 32K fwd+bwd −6.5%, peak −0.375 GiB, tests/test_gpu.py within its
    limits (worst: PKDA K = 256 log_atk_scale 9.8e-3 of 2e-2). Default since session o."""
    on = os.environ.get("PDELTA_REMAKE_WY_BF16", "1") == "1"
    half = input_dtype in (torch.bfloat16, torch.float16)
    return torch.bfloat16 if on and half and not states_remade else torch.float32


class GradHandoff:
    """Gradients passed between the stages of one layer instead of being summed by autograd.

    The output stage's backward runs before the stages that made its inputs. For each input that another stage
    also reads, it leaves its gradient here instead of returning it, and that stage's kernel backward adds its own
    contribution into it (in-kernel) and returns the sum — no [Nc, HV, C, K] float32 sums by autograd, no second
    gradient buffer:

    * ``"state_pass"``: dW, dU, for the state pass (which also writes its adjoints Λ over the dead dS: the output
      stage's dS goes to it alone). PGDN at K = V = 128: −10% of the fwd+bwd memory peak (graph_stats.py).
    * ``"states"``: dS in float32, for the state pass — S may be stored in bfloat16 (state_pass.states_dtype),
      and autograd would round a returned gradient to its input's dtype.
    * ``"wy"``: dP (per value head, before the fold over a key head's group), for the WY stage.
    * ``"write_keys"``: the WY stage's dK̂, for the write keys' backward (which reads K̂ too), and
      ``"weighted_squares"``: that sum, for the preconditioner's chunk ends (the last reader of K̂ in backward):
      K̂'s three gradients summed in-kernel, not by two autograd adds of [Nc, H, C, K] float32.

    A slot is armed by the taking stage's forward (the state pass only on its kernel path); the output stage leaves
    only into armed slots, and every PyTorch fallback of a taking stage adds what was left itself. If only
    gradients that do not pass through a taking stage are asked for (``torch.autograd.grad(o, q)``), what was left
    stays here until the graph is freed: correct (that stage's inputs get no gradient), only not early.
    """

    def __init__(self):
        self._armed: set[str] = set()
        self._left: dict[str, tuple[torch.Tensor, ...]] = {}

    def arm(self, slot: str) -> None:
        self._armed.add(slot)

    def armed(self, slot: str) -> bool:
        return slot in self._armed

    def leave(self, slot: str, *grads: torch.Tensor) -> None:
        self._left[slot] = grads

    def take(self, slot: str) -> tuple[torch.Tensor, ...] | None:
        return self._left.pop(slot, None)


def arm(handoff: GradHandoff | None, slot: str) -> None:
    """Arm ``slot`` of ``handoff`` (nothing without one): called by the taking stage's forward."""
    if handoff is not None:
        handoff.arm(slot)


def take_one(handoff: GradHandoff | None, slot: str) -> torch.Tensor | None:
    """The single gradient left in ``slot`` (None: nothing left, or no handoff), contiguous: the taking kernel adds
    into it in place (a PyTorch fallback's gradient can come with transposed strides)."""
    left = None if handoff is None else handoff.take(slot)
    return None if left is None else left[0].contiguous()


def pass_on(handoff: GradHandoff | None, slot: str, grad: torch.Tensor | None) -> torch.Tensor | None:
    """Leave ``grad`` in ``slot`` for the stage that armed it and return None to autograd (no sum there); without
    a handoff or an armed slot, return ``grad``."""
    if grad is None or handoff is None or not handoff.armed(slot):
        return grad
    handoff.leave(slot, grad)
    return None


def plus_left(grad: torch.Tensor | None, left: torch.Tensor) -> torch.Tensor:
    """A stage's own gradient (None: none) plus what the output stage left for it: the PyTorch fallbacks of the
    stages that take from a :class:`GradHandoff`."""
    return left if grad is None else grad + left


def fused_dw(K: int) -> bool:
    """The output's dW formed by the state pass (default since session p; PDELTA_FUSE_DW=0 opts out): where the state
    pass takes the output stage's gradients (GradHandoff "state_pass"), the output stage leaves dU = dΔ alone,
    without dW = −dΔ Sᵀ: the state pass's chunk-gradient kernel forms dW = −(dΔ + P̃Λ) Sᵀ in one product, since both
    terms multiply the same S_c. The output dS backward then reads no S tiles and keeps no [C, K] dW accumulator
    (H100, 32K tokens, H = 16: PGDN fwd+bwd 0.961×, PKDA 0.984×, peak −0.25 GiB, GPU tests passed). Only up to
    K = 128, where the state pass has that kernel (state_pass.split_backward_enabled); its other paths form the
    output's dW in PyTorch (:func:`left_dW`), correct but slower."""
    return os.environ.get("PDELTA_FUSE_DW", "1") != "0" and K <= 128


def left_dW(left: tuple, starts: torch.Tensor) -> torch.Tensor:
    """The output stage's dW from what it left for the state pass: as left, or −dU Sᵀ (float32) where it left dU
    alone (:func:`fused_dw`) and the state pass is off the fused kernel (its other paths and fallbacks)."""
    if left[0] is not None:
        return left[0]
    return -(left[1] @ starts.float().mT)


def add_left(grads: tuple, left: tuple | None, starts: torch.Tensor) -> tuple:
    """(dW, dU, *rest) with the output stage's left dW (see :func:`left_dW`; ``starts``: the chunk states S) and dU
    added (a state pass's backward off its kernel path)."""
    if left is None:
        return tuple(grads)
    dW, dU, *rest = grads
    return (plus_left(dW, left_dW(left, starts)), plus_left(dU, left[1]), *rest)


def save_wy(ctx, recompute: Recompute | None, wy: tuple, *others) -> None:
    """Save ``others`` for backward, and the WY tensors ``wy`` (W, U[, P̃]) too unless ``recompute`` remakes them
    (then its inputs are saved instead)."""
    ctx.n_wy = len(wy)
    if recompute is None:
        ctx.wy_cache, ctx.n_first = None, len(wy)
        remade.save(ctx, *wy, *others)
    else:
        ctx.wy_cache, ctx.n_first = recompute.cache, len(recompute.inputs)
        recompute.cache.register()
        remade.save(ctx, *recompute.inputs, *others)


def load_wy(ctx, states_at: int | None = None) -> tuple[tuple, tuple]:
    """(WY tensors, others) as saved by :func:`save_wy`; ``others[states_at]`` is the chunk states S, remade
    (once per backward, for both stages) if :func:`save_states` saved S_sub in its place. One read of
    ``ctx.saved_tensors``: non-reentrant checkpointing refuses a second."""
    first, others = remade.load(ctx, lazy=ctx.n_first)  # the WY stage's inputs: remade only if the cache is cold
    if states_at is not None and ctx.states is not None:
        S_sub = others[states_at]
        states = ctx.states.cache(lambda: first() + (S_sub,))[0]
        others = others[:states_at] + (states,) + others[states_at + 1:]
    if ctx.wy_cache is not None:
        return tuple(ctx.wy_cache(first)[:ctx.n_wy]), others
    return first(), others


def _fold_groups(t: torch.Tensor, H: int) -> torch.Tensor:
    """[Nc, HV, C, K] per value head -> [Nc, H, C, K] summed over each key head's group."""
    Nc, HV = t.shape[:2]
    if HV == H:  # one value head per key head: nothing to sum (a sum over a size-1 dim would still copy)
        return t
    return t.view(Nc, H, HV // H, *t.shape[2:]).sum(2)


class StreamRows(NamedTuple):
    """Where each chunk's rows live in a tensor of the stream layout [L, heads, dim] (the op's own q, k, v, o and
    their gradients, which the kernels read and write there): chunk c starts at token ``starts[c]`` and holds
    ``lens[c]`` tokens — C, but fewer in a segment's last chunk (its other rows are padding: read as zeros, never
    written). From the chunk plan (``chunk_start``, ``chunk_len``)."""

    starts: torch.Tensor  # [Nc] int64
    lens: torch.Tensor  # [Nc] int32
    num_tokens: int
    dense: bool  # every chunk whole (starts[c] = c·C): the kernels compute the rows and skip the tables


def stream_mode(rows: StreamRows | None) -> int:
    """The kernels' STREAM: 0 chunk layout, 1 stream layout of whole chunks, 2 stream layout by the row tables."""
    return 0 if rows is None else 1 if rows.dense else 2


def kernel_rows(rows: StreamRows | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' STARTS, LENS arguments: the row tables, or ``placeholder`` twice where the kernels do not read
    them (STREAM 0 and 1)."""
    return (placeholder, placeholder) if rows is None else (rows.starts, rows.lens)


def rows_saved(rows: StreamRows | None) -> tuple[torch.Tensor, ...]:
    """The row tables to ``save_for_backward`` (nothing on ctx: per-block recompute frees only saved tensors)."""
    return () if rows is None else (rows.starts, rows.lens)


def rows_meta(rows: StreamRows | None) -> tuple[int, bool] | None:
    """What :func:`rows_loaded` needs besides the saved tables (kept on ctx: no tensors)."""
    return None if rows is None else (rows.num_tokens, rows.dense)


def rows_loaded(saved: tuple[torch.Tensor, ...], meta: tuple[int, bool] | None) -> StreamRows | None:
    """:class:`StreamRows` again from :func:`rows_saved`'s tensors and :func:`rows_meta` (None: there were none)."""
    return None if meta is None else StreamRows(saved[0], saved[1], *meta)


def _row_index(rows: StreamRows) -> tuple[torch.Tensor, torch.Tensor]:
    """([Nc, C] stream index of every chunk row, ``num_tokens`` for padding; [Nc, C] whether it holds a token)."""
    r = torch.arange(C, device=rows.starts.device)
    valid = r[None, :] < rows.lens[:, None]
    return torch.where(valid, rows.starts[:, None] + r[None, :], rows.num_tokens), valid


def _stream_to_chunks(x: torch.Tensor, rows: StreamRows) -> torch.Tensor:
    """[L, HV, V] -> [Nc, HV, C, V] float32 (padding rows zero): the PyTorch fallbacks' operands."""
    idx, _ = _row_index(rows)
    padded = torch.cat([x.float(), x.new_zeros((1,) + x.shape[1:], dtype=torch.float32)])
    return padded[idx].movedim(1, 2).contiguous()


def _chunks_to_stream(x: torch.Tensor, rows: StreamRows, dtype: torch.dtype) -> torch.Tensor:
    """[Nc, HV, C, V] -> [L, HV, V] in ``dtype`` (padding rows dropped): a PyTorch fallback's result."""
    idx, valid = _row_index(rows)
    out = x.new_empty((rows.num_tokens, x.shape[1], x.shape[3]), dtype=dtype)
    out[idx[valid]] = x.movedim(1, 2)[valid].to(dtype)
    return out


def _chunk_values(v: torch.Tensor, rows: StreamRows | None) -> torch.Tensor:
    """V for a stage's PyTorch form: [Nc, HV, C, V] float32 (from the stream layout if ``rows`` are given)."""
    return v.float() if rows is None else _stream_to_chunks(v, rows)


def wy_backward_warps(K: int, config_warps: int) -> int:
    """num_warps of the WY backward kernels: 4 above K = 128 — at 8 they need 1 KB more shared memory than Hopper
    has (233472 of 232448 bytes, so PyTorch ran them), at 4 they fit and pass tests/test_gpu.py's K = 256 cases
    (H100 session o) — else the tile config's."""
    return 4 if K > 128 else config_warps


def split_wy_backward(channel_decay: bool) -> bool:
    """Whether the WY backward runs as two kernels — the value side and dL into a [Nc, HV, C, C] scratch
    (`wy._wy_bwd_dl_kernel`), then the key side reading dL and dLᵀ from it (FROM_DL) — instead of one kernel that
    also accumulates dTᵀ and forms dLᵀ by products (it never transposes a dot result in registers). Default for a
    per-channel decay (PKDA; H100, 32K tokens, H = 16: fwd+bwd 39.92 → 35.98 ms, 0.90×, peak +0.12 GiB for the
    scratch; its one-kernel backward spilled 6–10 KB per thread), not for a scalar one (PGDN 1.003×: not worth the
    scratch). PDELTA_WY_BWD_SPLIT=1 splits both, =0 neither."""
    forced = os.environ.get("PDELTA_WY_BWD_SPLIT")
    if forced is None:
        return channel_decay
    if forced not in ("0", "1"):
        raise ValueError(f"PDELTA_WY_BWD_SPLIT must be 0 or 1, got {forced!r}; unset it for the default")
    return forced == "1"


def wy_dp_in_dl() -> bool:
    """PDELTA_WY_BWD_DP_IN_DL=1 (opt-in, session p, CPU-tested only): in the split per-channel WY backward the first
    kernel also does the P side (dP and its share of dΓ, from dLᵀ read back from its own scratch after a barrier),
    so that each kernel holds one of the two Gram applies, and both run the P and key sides in a loop over
    key-column blocks of 32 (every term there is separable over key columns). sm_90 ptxas (Triton 3.9, K = V = 128):
    spill loads per thread 0 + 5.4 KB (the split default) → 0.23 + 0.25 KB. For a GPU A/B against the split
    default."""
    return os.environ.get("PDELTA_WY_BWD_DP_IN_DL", "0") == "1"


def make_wy_stage(name: str, fwd_kernel, bwd_kernel, torch_form: Callable, decay_shape: Callable,
                  kernel_backward: Callable[[], bool] = lambda: True, pick_fwd: Callable | None = None,
                  dl_kernel=None, channel_decay: bool = False):
    """(K̂, P [Nc,H,C,K]; V [Nc,HV,C,V], or with ``rows`` (:class:`StreamRows`) [L, HV, V] in the stream layout;
    β [Nc,HV,C]; Γ) -> (W, U, P̃, d) as float32 tensors (chunk layout). V in the stream layout is read there by the
    kernels, and dV written there.

    decay_shape(Nc, HV, K) gives d's shape; kernel_backward() says whether to use ``bwd_kernel``;
    pick_fwd(K), when given, returns (forward kernel, its num_warps or None for the tile config's[, extra
    constexprs]), chosen per call (by the key size, or an env switch). ``dl_kernel``: the first half of the split
    backward (:func:`split_wy_backward`), ``bwd_kernel`` with FROM_DL its second; ``channel_decay``: Γ is [.., C, K].
    The returned function has a ``remake`` attribute: (W, U, P̃, d) again from the inverse T the forward stored, by
    the same kernel without its Gram and solve.
    """

    def launch_forward(k_hat, p, v, beta, gamma, T=None, rows: StreamRows | None = None,
                       wy_dtype: torch.dtype = torch.float32, with_u: bool = True):
        """(W, U, P̃, d, T) from the forward kernel, or None when it does not fit the GPU; with T given, the
        kernel reads it (FROM_T) instead of forming and storing it: the same arithmetic for everything else.
        ``wy_dtype``: storage of W, U, P̃ (the kernel's stores round to it); without ``with_u`` U is None (not
        written: see :meth:`Recompute.without_u`)."""
        Nc, H, _, K = k_hat.shape
        HV, V = v.shape[1], v.shape[-1]  # v: [Nc, HV, C, V] or [L, HV, V]
        BK, BV, warps, stages = chunk_tile_config(K, V)
        W, P_t = k_hat.new_empty(Nc, HV, C, K, dtype=wy_dtype), k_hat.new_empty(Nc, HV, C, K, dtype=wy_dtype)
        starts, lens = kernel_rows(rows, beta)
        U = k_hat.new_empty(Nc, HV, C, V, dtype=wy_dtype) if with_u else None
        d = k_hat.new_empty(decay_shape(Nc, HV, K))
        from_t, T = T is not None, k_hat.new_empty(Nc, HV, C, C) if T is None else T
        kernel, fwd_warps, *options = (fwd_kernel, None) if pick_fwd is None else pick_fwd(K)
        if Nc > 0 and not launch_or_fallback(f"{name}_fwd", lambda: kernel[(Nc, HV)](
                k_hat, p, v, beta, gamma, W, W if U is None else U, P_t, T, d, H, HV, HV // H, starts, lens, K=K, V=V,
                C=C, BK=BK, BV=BV, PRECISION=dot_precision(), FROM_T=from_t, STREAM=stream_mode(rows),
                STORE_U=with_u, **(options[0] if options else {}),
                **launch_config(f"{name}_fwd", fwd_warps or warps, stages))):
            return None
        return W, U, P_t, d, T

    class Stage(torch.autograd.Function):
        @staticmethod
        def forward(ctx, k_hat, p, v, beta, gamma, handoff, rows):
            out = launch_forward(k_hat, p, v, beta, gamma, rows=rows)
            ctx.fallback, ctx.rows_meta = out is None, rows_meta(rows)
            if ctx.fallback:  # no inverse stored: an empty T tells the caller (and this backward) so
                W, U, P_t, d = (t.contiguous() for t in torch_form(k_hat, p, _chunk_values(v, rows), beta, gamma))
                T = k_hat.new_empty(0)
            else:
                W, U, P_t, d, T = out
            remade.save(ctx, k_hat, p, v, beta, gamma, T, *rows_saved(rows), share=True)  # K̂, P: after the peak
            ctx.mark_non_differentiable(T)
            ctx.set_materialize_grads(False)  # no zero [Nc, HV, C, C] gradient for T (the backward takes None)
            ctx.handoff = handoff
            if handoff is not None:
                handoff.arm("wy")
            return W, U, P_t, d, T

        @staticmethod
        def backward(ctx, dW, dU, dP_t, dd, dT):
            k_hat, p, v, beta, gamma, T, *row_tables = remade.load(ctx)[1]
            Nc, H, _, K = k_hat.shape
            HV, V = v.shape[1], v.shape[-1]  # v: [Nc, HV, C, V] or [L, HV, V]
            rows = rows_loaded(row_tables, ctx.rows_meta)
            starts, lens = kernel_rows(rows, beta)
            grads = (dW, dU, dP_t, dd)
            left = take_one(ctx.handoff, "wy")  # the output stage's dP, per value head (the kernel adds into it)
            dp_in_left = False
            if Nc and not ctx.fallback and kernel_backward():
                BK, BV, warps, stages = chunk_tile_config(K, V)
                shapes = ((Nc, HV, C, K), (Nc, HV, C, V), (Nc, HV, C, K), decay_shape(Nc, HV, K))
                z = [k_hat.new_zeros(s) if g is None else g.contiguous() for g, s in zip(grads, shapes)]
                dk, dp = torch.empty_like(z[0]), torch.empty_like(z[0]) if left is None else left
                # dV in V's own dtype (the kernel's store rounds once): no float32 buffer for autograd to cast
                dv, dbeta, dgam = torch.empty_like(v), torch.empty_like(beta), torch.empty_like(gamma)
                split = dl_kernel is not None and split_wy_backward(channel_decay)
                dp_in_dl = split and channel_decay and wy_dp_in_dl()
                # key-column blocks: the channel kernels with the P side in the dL kernel; the scalar key side after a
                # dL kernel under PDELTA_WY_KEY_BLOCKS (opt-ins)
                width = 32 if dp_in_dl else (wy_key_blocks() if split and not channel_decay else 0)
                blocks = {"KB": min(BK, width)} if width else {}
                dl = torch.empty_like(T) if split else T  # (unread without FROM_DL)
                common = dict(K=K, V=V, C=C, BK=BK, BV=BV, ACCUMULATE_DP=left is not None, PRECISION=dot_precision(),
                              STREAM=stream_mode(rows))
                ins, tables = (k_hat, p, v, beta, gamma, T, *z, dl), (H, HV, HV // H, starts, lens)
                bwd_warps = wy_backward_warps(K, warps)
                first_half = split and launch_or_fallback(f"{name}_bwd_dl", lambda: dl_kernel[(Nc, HV)](
                    *ins, dp, dv, dbeta, dgam, *tables, **common, WITH_DP=dp_in_dl, **blocks,
                    **launch_config(f"{name}_bwd_dl", bwd_warps, stages)))
                # a dL kernel that does not fit wrote nothing: the one-kernel backward then
                split, dp_in_dl = first_half, dp_in_dl and first_half
                if launch_or_fallback(f"{name}_bwd", lambda: bwd_kernel[(Nc, HV)](
                        *ins, dk, dp, dv, dbeta, dgam, *tables, **common, FROM_DL=split, DP_DONE=dp_in_dl, **blocks,
                        **launch_config(f"{name}_bwd", bwd_warps, stages))):
                    dk = pass_on(ctx.handoff, "write_keys", _fold_groups(dk, H))
                    return dk, _fold_groups(dp, H), dv, dbeta, dgam, None, None
                # a dL kernel that wrote dP (WITH_DP) and ran left the output stage's dP plus its own in ``left``
                dp_in_left = dp_in_dl and left is not None
            dk, dp, dv, *rest = torch_form_grads(torch_form, (k_hat, p, _chunk_values(v, rows), beta, gamma), grads)
            if dp_in_left:
                dp = _fold_groups(left, H)
            elif left is not None:
                dp = plus_left(dp, _fold_groups(left, H))
            dv = dv if rows is None else _chunks_to_stream(dv, rows, v.dtype)
            return pass_on(ctx.handoff, "write_keys", dk), dp, dv, *rest, None, None

    Stage.__name__ = f"{name}_stage"

    def prepared(k_hat, p, v, beta, gamma):
        """float32 everywhere, except that 16-bit V is passed as it is (the kernels promote it when loading)."""
        v = v.contiguous() if v.dtype in (torch.bfloat16, torch.float16) else v.contiguous().float()
        return (*(t.contiguous().float() for t in (k_hat, p)), v, *(t.contiguous().float() for t in (beta, gamma)))

    def apply(k_hat, p, v, beta, gamma, handoff: GradHandoff | None = None, with_inverse: bool = False,
              rows: StreamRows | None = None):
        """(W, U, P̃, d), and with ``with_inverse`` the stored inverse T [Nc, HV, C, C] too (None when the forward ran
        in PyTorch). ``handoff``: shared with the output stage that reads P too (see :class:`GradHandoff`).
        ``rows``: V in the stream layout (:class:`StreamRows`)."""
        W, U, P_t, d, T = Stage.apply(*prepared(k_hat, p, v, beta, gamma), handoff, rows)
        if not with_inverse:
            return W, U, P_t, d
        return W, U, P_t, d, (T if T.numel() else None)

    def remake(k_hat, p, v, beta, gamma, T, rows: StreamRows | None = None, wy_dtype: torch.dtype = torch.float32,
               with_u: bool = True):
        """(W, U, P̃, d) from the stored inverse T (no gradient): bitwise what the forward returned (rounded to
        ``wy_dtype``, see :func:`remade_wy_dtype`); U None without ``with_u`` (:meth:`Recompute.without_u`)."""
        args = prepared(k_hat, p, v, beta, gamma)
        out = launch_forward(*args, T=T, rows=rows, wy_dtype=wy_dtype, with_u=with_u)
        if out is None:  # cannot happen after the same kernel ran in forward; stay correct anyway
            k_hat, p, v, beta, gamma = args
            return tuple(t.contiguous() for t in torch_form(k_hat, p, _chunk_values(v, rows), beta, gamma))
        return out[:4]

    apply.remake = remake
    return apply


def _key_block_width(var: str) -> int:
    value = os.environ.get(var, "0")
    if value not in ("0", "16", "32", "64"):
        raise ValueError(f"{var} must be 0, 16, 32 or 64, got {value!r}; unset it for the default")
    return int(value)


def output_key_blocks() -> int:
    """PDELTA_OUTPUT_KEY_BLOCKS=16|32|64 (opt-in, session p, CPU-tested only; 0 or unset: off): PKDA's output
    kernels work in a loop over blocks of that many key columns, holding [C, block] instead of [C, K] float32 tiles:
    the forward and the dS backward sum the Gram A and the products over the key dimension block by block, the
    dQ̂/dP backward runs its key side (dQ̂, dP, dΓ: separable over key columns) block by block after its V loop.
    sm_90 ptxas (Triton 3.9, K = V = 128, Δ kept): see docs/kernels.md. For a GPU A/B."""
    return _key_block_width("PDELTA_OUTPUT_KEY_BLOCKS")


def wy_key_blocks() -> int:
    """PDELTA_WY_KEY_BLOCKS=16|32|64 (opt-in, session p, CPU-tested only): PKDA's blocked WY forward (and its remake
    from T) sums the Gram over key-column blocks of that width and writes W, P̃, d block by block; with the split
    backward for PDN/PGDN (PDELTA_WY_BWD_SPLIT=1) its key side runs by such blocks too. For a GPU A/B."""
    return _key_block_width("PDELTA_WY_KEY_BLOCKS")


def make_output_stage(name: str, fwd_kernel, bwd_state_kernel, bwd_qp_kernel, torch_form: Callable,
                      key_blocks: Callable[[int], int] = lambda BK: 0):
    """(Q̂, P [Nc,H,C,K]; Γ; W [Nc,HV,C,K]; U [Nc,HV,C,V]; S [Nc,HV,K,V]) -> O [Nc,HV,C,V] (float32), or with
    ``rows`` (:class:`StreamRows`) O [L, HV, V] in ``stream_dtype``: the stream layout, written (and dO read) by
    the kernels themselves. ``delta``: Δ = U − W S [Nc,HV,C,V] as the state pass kept it (state_pass.keeps_delta),
    read by the forward and dQ̂/dP kernels in its place; gradients still go to W, U and S (Δ is not an input).
    ``key_blocks(BK)``: key-column block width KB of the kernels that take one (0: none; :func:`output_key_blocks`)."""

    class Stage(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q_hat, p, gamma, W, U, S, delta, recompute, handoff, rows, stream_dtype):
            Nc, H, _, K = q_hat.shape
            HV, V = U.shape[1], U.shape[-1]
            BK, BV, warps, stages = chunk_tile_config(K, V)
            stream = rows is not None
            O = U.new_empty(rows.num_tokens, HV, V, dtype=stream_dtype) if stream else U.new_empty(Nc, HV, C, V)
            starts, lens = kernel_rows(rows, gamma)
            blocks = {"KB": kb} if (kb := key_blocks(BK)) else {}
            ctx.fallback = Nc > 0 and not launch_or_fallback(f"{name}_fwd", lambda: fwd_kernel[(Nc, HV)](
                q_hat, p, gamma, W, U, S, U if delta is None else delta, O, H, HV, HV // H, starts, lens, K=K, V=V,
                C=C, BK=BK, BV=BV, PRECISION=dot_precision(), STREAM=stream_mode(rows), HAS_DELTA=delta is not None,
                **blocks, **launch_config(f"{name}_fwd", warps, stages)))
            if ctx.fallback:
                O = torch_form(q_hat, p, gamma, W, U, S.float())
                O = _chunks_to_stream(O, rows, stream_dtype) if stream else O
                if recompute is not None:  # the PyTorch backward reads U
                    recompute.keep_u()
            save_wy(ctx, recompute, (W, U), q_hat, p, gamma, save_states(ctx, recompute, S),
                    None if ctx.fallback else delta, *rows_saved(rows))
            ctx.handoff, ctx.rows_meta = handoff, rows_meta(rows)
            return O

        @staticmethod
        def backward(ctx, dO):
            (W, U), (q_hat, p, gamma, S, delta, *row_tables) = load_wy(ctx, states_at=3)  # U may be None: Δ kept
            Nc, H, _, K = q_hat.shape
            HV, V = S.shape[1], S.shape[-1]
            BK, BV, warps, stages = chunk_tile_config(K, V)
            dO = dO.contiguous()
            # the state pass forms the output's dW with its own (one product): only where it takes our dU
            dw_here = not (fused_dw(K) and ctx.handoff is not None and ctx.handoff.armed("state_pass"))
            dq, dp = grad_buffer(W, W.shape), grad_buffer(W, W.shape)
            dW = grad_buffer(W, W.shape) if dw_here else dq  # (not written without STORE_DW)
            # dS in float32 whatever S's storage (or bfloat16, see adjoint_dtype); it reaches the state pass
            # through the handoff's "states" slot (autograd would cast it to S's dtype)
            dU, dS = grad_buffer(W, (Nc, HV, C, V)), torch.empty_like(S, dtype=adjoint_dtype(S))
            dgam = torch.empty_like(gamma)
            rows = rows_loaded(row_tables, ctx.rows_meta)
            starts, lens = kernel_rows(rows, gamma)
            common = dict(K=K, V=V, C=C, BK=BK, BV=BV, PRECISION=dot_precision(), STREAM=stream_mode(rows))
            # PDELTA_SCRATCH_TRANSPOSE=1 (opt-in): dA and Aᵀ as transposes through [C, C] scratch rows
            scratch = grad_buffer(W, (Nc, HV, C, C)) if os.environ.get("PDELTA_SCRATCH_TRANSPOSE") == "1" else None
            blocks = {"KB": kb} if (kb := key_blocks(BK)) else {}
            u_arg = delta if U is None else U  # (U left out of the remake: the kernel reads Δ, never U)
            if Nc and not ctx.fallback and launch_or_fallback(
                    f"{name}_bwd_state", lambda: bwd_state_kernel[(Nc, HV)](
                        q_hat, p, gamma, W, S, dO, dW, dU, dS, H, HV, HV // H, starts, lens, STORE_DW=dw_here,
                        **({} if dw_here else blocks), **launch_config(f"{name}_bwd_state", warps, stages),
                        **common)) \
                    and launch_or_fallback(f"{name}_bwd_qp", lambda: bwd_qp_kernel[(Nc, HV)](
                        q_hat, p, gamma, W, u_arg, S, U if delta is None else delta, dO, dq, dp, dgam,
                        scratch if scratch is not None else dq, H, HV, HV // H, starts, lens,
                        SCRATCH=scratch is not None, DOS_BF16=exact_in_bf16(dO, S), HAS_DELTA=delta is not None,
                        **launch_config(f"{name}_bwd_qp", warps, stages), **blocks,
                        **common)):
                handoff = ctx.handoff
                if handoff is not None and handoff.armed("state_pass"):  # it adds its dW, dU and returns the sums
                    handoff.leave("state_pass", dW if dw_here else None, dU)
                    dW = dU = None
                dp = pass_on(handoff, "wy", dp)  # the WY stage adds its dP and folds the sum
                return (_fold_groups(dq, H), None if dp is None else _fold_groups(dp, H), dgam, dW, dU,
                        pass_on(handoff, "states", dS), None, None, None, None, None)
            if not Nc:
                return (torch.zeros_like(q_hat), torch.zeros_like(p), dgam, grad_buffer(W, W.shape, zeros=True), dU, dS,
                        None, None, None, None, None)
            dO = dO if rows is None else _stream_to_chunks(dO, rows)
            U = u_again(U, W, S, delta).float()
            *grads, dS = torch_form_grads(torch_form, (q_hat, p, gamma, W.float(), U, S.float()), (dO,))
            return (*grads, pass_on(ctx.handoff, "states", dS), None, None, None, None, None)

    Stage.__name__ = f"{name}_stage"

    def apply(q_hat, p, gamma, W, U, S, recompute: Recompute | None = None, handoff: GradHandoff | None = None,
              rows: StreamRows | None = None, stream_dtype: torch.dtype = torch.float32,
              delta: torch.Tensor | None = None):
        """``handoff``: shared with the state pass that made S and the WY stage that made W, U (see
        :class:`GradHandoff`). ``rows``: O in the stream layout [L, HV, V] (:class:`StreamRows`) and
        ``stream_dtype``. ``delta``: Δ kept by the state pass, or None (formed from W, U, S)."""
        S = S.contiguous() if S.dtype == torch.bfloat16 else S.contiguous().float()  # see state_pass.states_dtype
        delta = None if delta is None else delta.contiguous()
        return Stage.apply(*[t.contiguous().float() for t in (q_hat, p, gamma, W, U)], S, delta, recompute, handoff,
                           rows, stream_dtype)

    return apply
