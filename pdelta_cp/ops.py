"""The public op: validate, agree across CP ranks, pick a backend, run, assemble the final states."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .chunk.pipeline import StreamInputs, chunked_precond_delta_rule
from .cp.comm import agree, replicate_sum, signature, world_and_rank
from .cp.layout import stream_layout
from .indices import index_tensor
from .validation import check_inputs, check_options

__all__ = ["precond_delta_rule"]


def _group_device(group, fallback: torch.device) -> torch.device:
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _triton_runs_on(device: torch.device) -> bool:
    from .kernels._triton_utils import triton_available

    return triton_available(device)


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": Triton on CUDA for 16/32-bit inputs, else the PyTorch chunk path."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 and _triton_runs_on(device) else "torch"
    if dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32 with float32/bfloat16/float16 inputs; "
                         "use backend='torch' for float64")
    if not _triton_runs_on(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and an installed "
                         f"triton; the inputs are on {device}. Use backend='torch' or 'auto'")
    return "triton"


def precond_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g_atk: Tensor,
    beta_atk: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    x: float = 1.5,
    eps: float = 1e-6,
    log_atk_scale: float | Tensor = -0.2,
    qk_l2norm: bool = True,
    initial_state: Tensor | None = None,
    initial_A_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cp_group=None,
    cp_layout: str = "contiguous",
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Preconditioned delta rule: PDN (``g=None``), PGDN (scalar ``g``) or PKDA (per-channel ``g``).

    Shapes (B batch, T tokens on this rank, H key heads, HV value heads (a multiple of H), K key dim, V value dim):
        q, k [B,T,H,K]; v [B,T,HV,V]; beta [B,T,HV]; g_atk, beta_atk [B,T,H];
        g None | [B,T,HV] | [B,T,HV,K]; log_atk_scale float or [H];
        initial_state [N,HV,K,V]; initial_A_state [N,H,K] (N = B, or the number of sequences in cu_seqlens).
    Returns ``(o [B,T,HV,V] in v's dtype, final_S [N,HV,K,V], final_A [N,H,K])``; the final states are float32
    (float64 for float64 inputs) and ``None`` unless ``output_final_state``.

    Context parallelism: with ``cp_group`` (any ``torch.distributed`` group), each rank passes only the
    tokens it holds under ``cp_layout`` — ``"contiguous"``: piece r of W; ``"zigzag"``: pieces r and 2W-1-r of
    2W, concatenated — and gets exactly what one process computes on the whole stream. ``cu_seqlens`` then
    describes the whole stream (global boundaries). Tensors held in full by every rank (``log_atk_scale``,
    ``initial_state``, ``initial_A_state``) receive each rank's own gradient contribution: their sum over the
    group is the single-process gradient. The final states are complete and identical on every rank; a loss
    term on them is taken to be computed identically on every rank (counted once).
    """
    world, rank = world_and_rank(cp_group)
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    error, problem = None, None
    try:
        H = q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else None
        check_options(x=x, eps=eps, scale=scale, cp_layout=cp_layout, backend=backend,
                      log_atk_scale=log_atk_scale, H=H)
        problem = check_inputs(q, k, v, beta, g_atk, beta_atk, g, initial_state=initial_state,
                               initial_A_state=initial_A_state, cu_seqlens=cu_seqlens, world=world,
                               cp_layout=cp_layout)
        backend = _resolve_backend(backend, device, q.dtype)
    except (ValueError, TypeError, NotImplementedError) as exc:
        error = exc
    # ranks that would run different backward graphs (different requires_grad) would wait on each other
    tensors = (q, k, v, beta, g_atk, beta_atk, g, initial_state, initial_A_state, log_atk_scale)
    grads = tuple(isinstance(t, Tensor) and t.requires_grad for t in tensors) + (torch.is_grad_enabled(),)
    sig = 0 if problem is None else signature(
        problem, str(q.dtype), x, eps, scale, qk_l2norm, output_final_state, cp_layout, backend,
        isinstance(log_atk_scale, Tensor), initial_state is not None, initial_A_state is not None, grads,
    )
    agree(error, sig, cp_group, _group_device(cp_group, device), "precond_delta_rule")

    P = problem
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    def stream(t: Tensor | None) -> Tensor | None:  # [B, T, ...] -> [B*T, ...]; dtype converted in chunk layout
        return None if t is None else t.reshape((P.B * P.T,) + tuple(t.shape[2:]))

    centre = torch.as_tensor(log_atk_scale, device=device).to(dtype).expand(P.H)
    layout = stream_layout(P.B, P.T, list(P.cu_seqlens) if P.cu_seqlens else None, world, rank, cp_layout)
    # The chunk algorithm runs in float32 by design (long chains and summaries need it): an enclosing autocast
    # region would silently drop its matmuls to bf16 and break the dtype contracts of the custom backward passes.
    with torch.autocast(device.type, enabled=False):
        out = chunked_precond_delta_rule(
            StreamInputs(
                q=stream(q), k=stream(k), v=stream(v), beta=stream(beta), g_atk=stream(g_atk),
                beta_atk=stream(beta_atk), g=stream(g), centre=centre, x=float(x), eps=float(eps), dtype=dtype,
                qk_l2norm=qk_l2norm,
                q_scale=float(P.K ** -0.5 if scale is None else scale),
                initial_state=None if initial_state is None else initial_state.to(dtype),
                initial_A_state=None if initial_A_state is None else initial_A_state.to(dtype),
            ),
            layout,
            cp_group,
            backend,
        )
        o = out.o.reshape(P.B, P.T, P.HV, P.V).to(v.dtype)
        if not output_final_state:
            return o, None, None
        # each sequence's final state lives on the rank holding its last token; assemble and share
        ends = [(i, s.seq) for i, s in enumerate(layout.segments) if s.ends_sequence]
        seg_ids = index_tensor([i for i, _ in ends], device)
        seq_ids = index_tensor([n for _, n in ends], device)
        final_S = out.final_S.new_zeros((P.num_sequences, P.HV, P.K, P.V)).index_put((seq_ids,), out.final_S[seg_ids])
        final_A = out.final_A.new_zeros((P.num_sequences, P.H, P.K)).index_put((seq_ids,), out.final_A[seg_ids])
        return o, replicate_sum(final_S, cp_group), replicate_sum(final_A, cp_group)
