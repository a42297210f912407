"""Argument checks for :func:`pdelta_cp.precond_delta_rule`: clear errors that name the argument and the fix."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .cp.layout import LAYOUTS, pieces_per_sample

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, after validation."""

    B: int
    T: int  # local tokens per row
    H: int
    HV: int
    K: int
    V: int
    variant: str  # "pdn" | "pgdn" | "pkda"
    cu_seqlens: tuple[int, ...] | None
    num_sequences: int


def _need(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_tensor(name: str, t, shape: tuple[int, ...], device) -> None:
    _need(isinstance(t, Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.is_floating_point(), TypeError, f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                                            f"got {t.dtype}")
    _need(tuple(t.shape) == shape, ValueError, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _need(t.device == device, ValueError,
          f"{name} is on {t.device} but q is on {device}; move all inputs to one device")


def check_options(*, x: float, eps: float, scale, cp_layout: str, backend: str, log_atk_scale, H: int | None) -> None:
    """Option checks that do not depend on tensor shapes."""
    _need(cp_layout in LAYOUTS, ValueError, f"cp_layout must be one of {LAYOUTS}, got {cp_layout!r}")
    _need(backend in BACKENDS, ValueError, f"backend must be one of {BACKENDS}, got {backend!r}")
    _need(isinstance(x, (int, float)) and x >= 1, ValueError,
          f"x (squash range) must be a number >= 1 (x = 1 turns preconditioning off), got {x!r}")
    _need(isinstance(eps, (int, float)) and eps > 0, ValueError, f"eps must be a number > 0, got {eps!r}")
    _need(scale is None or (isinstance(scale, (int, float)) and scale > 0), ValueError,
          f"scale must be None (= K**-0.5) or a number > 0, got {scale!r}")
    if isinstance(log_atk_scale, Tensor):
        _need(log_atk_scale.is_floating_point(), TypeError,
              f"log_atk_scale must be a float or a floating tensor of shape [H], got dtype {log_atk_scale.dtype}")
        _need(H is None or tuple(log_atk_scale.shape) in ((H,), ()), ValueError,
              f"log_atk_scale must be a float or a tensor of shape [H] = [{H}], got {list(log_atk_scale.shape)}")
    else:
        _need(isinstance(log_atk_scale, (int, float)), TypeError,
              f"log_atk_scale must be a float or a tensor of shape [H], got {type(log_atk_scale).__name__}")


def check_inputs(q, k, v, beta, g_atk, beta_atk, g, *, initial_state, initial_A_state, cu_seqlens,
                 world: int, cp_layout: str) -> Problem:
    _need(isinstance(q, Tensor) and q.dim() == 4, ValueError,
          f"q must be a 4-D tensor [B, T, H, K], got {getattr(q, 'shape', type(q).__name__)}")
    B, T, H, K = q.shape
    dev = q.device
    _check_tensor("q", q, (B, T, H, K), dev)
    _check_tensor("k", k, (B, T, H, K), dev)
    _need(isinstance(v, Tensor) and v.dim() == 4 and tuple(v.shape[:2]) == (B, T), ValueError,
          f"v must have shape [B, T, HV, V] = [{B}, {T}, HV, V], got {getattr(v, 'shape', None)}")
    HV, V = v.shape[2], v.shape[3]
    _check_tensor("v", v, (B, T, HV, V), dev)
    _need(HV % H == 0, ValueError, f"the value heads HV = {HV} (v.shape[2]) must be a multiple of the key heads "
                                   f"H = {H} (q.shape[2]); grouped value heads share a key head")
    _need(T > 0 and K > 0 and V > 0, ValueError, f"T, K and V must be positive, got T={T}, K={K}, V={V}")
    _need(q.dtype == k.dtype == v.dtype, TypeError,
          f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _check_tensor("beta", beta, (B, T, HV), dev)
    _check_tensor("g_atk", g_atk, (B, T, H), dev)
    _check_tensor("beta_atk", beta_atk, (B, T, H), dev)
    if g is None:
        variant = "pdn"
    else:
        _need(isinstance(g, Tensor) and g.dim() in (3, 4), ValueError,
              f"g must be None (PDN), [B, T, HV] (PGDN) or [B, T, HV, K] (PKDA), got {getattr(g, 'shape', g)}")
        variant = "pgdn" if g.dim() == 3 else "pkda"
        _check_tensor("g", g, (B, T, HV) if variant == "pgdn" else (B, T, HV, K), dev)

    cu = None
    if cu_seqlens is not None:
        _need(isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and not cu_seqlens.is_floating_point()
              and cu_seqlens.numel() >= 2, ValueError,
              "cu_seqlens must be a 1-D integer tensor [N+1] of sequence boundaries (e.g. tensor([0, 100, 250]))")
        _need(B == 1, ValueError, f"with cu_seqlens the sequences are packed into one row: B must be 1, got B={B}; "
                                  f"flatten the batch into one packed row")
        cu = tuple(int(c) for c in cu_seqlens.tolist())
        _need(cu[0] == 0, ValueError, f"cu_seqlens must start at 0, got {cu[0]}")
        _need(all(b > a for a, b in zip(cu, cu[1:])), ValueError,
              f"cu_seqlens must be strictly increasing (no empty sequences), got {list(cu)}")
        total = T * world
        _need(cu[-1] == total, ValueError,
              f"cu_seqlens[-1] = {cu[-1]} must equal the total number of tokens"
              + (f" of the whole stream: {world} CP ranks x T = {T} local tokens = {total}; with CP, cu_seqlens "
                 f"describes the global stream" if world > 1 else f" T = {T}"))
    if cp_layout == "zigzag_per_sequence" and cu is not None:
        bad = [n for n, (a, b) in enumerate(zip(cu, cu[1:])) if (b - a) % (2 * world)]
        _need(not bad, ValueError, f"cp_layout='zigzag_per_sequence' cuts every sequence into {2 * world} equal "
                                   f"pieces; sequences {bad[:5]} are not multiples of {2 * world} tokens: pad "
                                   f"each sequence (as Megatron does for THD batches)")
    parts = world * pieces_per_sample(cp_layout)
    _need((T * world) % parts == 0, ValueError,
          f"cp_layout={cp_layout!r} with {world} ranks cuts each stream into {parts} equal pieces, so the local "
          f"length T = {T} must be a multiple of {parts // world}; pad the sequence")
    N = (len(cu) - 1) if cu is not None else B
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (N, HV, K, V), dev)
    if initial_A_state is not None:
        _check_tensor("initial_A_state", initial_A_state, (N, H, K), dev)
    return Problem(B, T, H, HV, K, V, variant, cu, N)
