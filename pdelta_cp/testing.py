"""Helpers shared by the tests, the demo and the benchmarks: random inputs and error metrics."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = ("pdn", "pgdn", "pkda")


def rel_rms(actual: Tensor, expected: Tensor) -> float:
    """Relative RMS error ||actual - expected|| / ||expected|| (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


def make_inputs(
    *, B: int = 1, T: int = 128, H: int = 2, HV: int | None = None, K: int = 16, V: int = 16,
    variant: str = "pgdn", dtype=torch.float64, seed: int = 0, num_sequences: int | None = None,
    states: bool = True, learnable_centre: bool = True, decay_strength: float = 1.0, device="cpu",
) -> dict[str, Tensor]:
    """Random op inputs as leaf tensors (requires_grad) keyed by argument name.

    Gates follow the reference tests: g, g_atk = logsigmoid(N(.)) (scaled by ``decay_strength``); gains in (0, 1).
    ``num_sequences`` sizes the initial states (default B); ``states`` adds non-zero initial S and A.
    """
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, fn=torch.randn):
        return fn(*shape, generator=gen, dtype=torch.float64)

    out = {
        "q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, HV, V),
        "beta": torch.sigmoid(rnd(B, T, HV)),
        "g_atk": F.logsigmoid(rnd(B, T, H) + 3.0) * decay_strength,
        "beta_atk": torch.sigmoid(rnd(B, T, H)),
    }
    if variant == "pgdn":
        out["g"] = F.logsigmoid(rnd(B, T, HV) + 2.0) * decay_strength
    elif variant == "pkda":
        out["g"] = F.logsigmoid(rnd(B, T, HV, K) + 2.0) * decay_strength
    N = num_sequences or B
    if states:
        out["initial_state"] = rnd(N, HV, K, V) * 0.5
        out["initial_A_state"] = rnd(N, H, K, fn=torch.rand)
    if learnable_centre:
        out["log_atk_scale"] = -0.2 + 0.3 * rnd(H)
    return {name: t.to(device=device, dtype=dtype).requires_grad_(True) for name, t in out.items()}


SEQUENCE_ARGS = ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")  # tensors with a token dim (dim 1)


def output_weights(o: Tensor, final_S: Tensor | None, final_A: Tensor | None, seed: int = 1) -> list[Tensor | None]:
    """Fixed random cotangents for (o, final_S, final_A), so one scalar loss tests every output's gradient."""
    gen = torch.Generator().manual_seed(seed)
    return [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
            for t in (o, final_S, final_A)]


def weighted_loss(outputs, weights) -> Tensor:
    return sum((t * w).sum() for t, w in zip(outputs, weights) if t is not None)


def call(fn, inputs: dict[str, Tensor], **kw):
    """Call the op or the reference with the tensors of ``inputs`` (as made by :func:`make_inputs`)."""
    args = [inputs.get(n) for n in SEQUENCE_ARGS]
    for name in ("initial_state", "initial_A_state", "log_atk_scale"):
        if name in inputs:
            kw.setdefault(name, inputs[name])
    return fn(*args, **kw)


def outputs_and_grads(fn, inputs: dict[str, Tensor], weights=None, **kw):
    """(outputs, {name: grad}) of the weighted loss of all outputs w.r.t. every input in ``inputs``."""
    outs = call(fn, inputs, **kw)
    weights = weights or output_weights(*outs)
    names = [n for n, t in inputs.items() if t.requires_grad]
    grads = torch.autograd.grad(weighted_loss(outs, weights), [inputs[n] for n in names], allow_unused=True)
    return outs, {n: (torch.zeros_like(inputs[n]) if gr is None else gr) for n, gr in zip(names, grads)}


_NOT_STATE = (type, types.FunctionType, types.MethodType, types.ModuleType)  # code, not data a ctx could hold


def _tensors_held(obj, depth: int = 0):
    """Tensors reachable from ``obj`` through containers and plain objects' attributes (a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4:
        if isinstance(obj, (list, tuple, set)):
            items = obj
        elif isinstance(obj, dict):
            items = obj.values()
        elif hasattr(obj, "__dict__") and not isinstance(obj, _NOT_STATE):
            items = vars(obj).values()
        else:
            items = ()
        for item in items:
            yield from _tensors_held(item, depth + 1)


def custom_autograd_nodes(output: Tensor) -> list:
    """Every custom autograd Function's backward node (its ``ctx``) in the graph below ``output``."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def tensors_on_ctx(output: Tensor) -> list[tuple[str, str, tuple]]:
    """(Function, attribute, shape) of every tensor that a custom autograd Function below ``output`` keeps as an
    attribute of its ``ctx`` instead of through ``save_for_backward``.

    Activation checkpointing frees saved tensors after forward and remakes them in backward; a tensor on ``ctx``
    escapes that and stays alive until backward, in every checkpointed layer. Empty means none escapes."""
    return [(type(node).__name__, name, tuple(t.shape)) for node in custom_autograd_nodes(output)
            for name, value in vars(node).items() for t in _tensors_held(value)]


def saved_float_bytes(fn, *args):
    """(``fn(*args)``, bytes of the distinct floating-point storages autograd saves for its backward)."""
    saved = {}

    def pack(t: Tensor) -> Tensor:
        if t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(saved.values())
