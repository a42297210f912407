"""The op under activation checkpointing (per-block recompute, as the training presets use it).

Checkpointing frees what autograd saves through ``save_for_backward`` and remakes it in backward; a tensor kept
as an attribute of ``ctx`` escapes that and stays alive for every layer until backward. One such leak (the WY
recompute inputs, 14 KB per token per layer at the 340M shape) made 1M-token training run out of memory.
"""
import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.testing import call, make_inputs, outputs_and_grads, rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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


def _custom_nodes(root):
    """Every custom autograd Function's backward node (its ``ctx``) in the graph below ``root``."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            yield node
        stack.extend(fn for fn, _ in node.next_functions)


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_tensor_held_on_ctx(variant, backend):
    inp = make_inputs(T=150, H=2, HV=4, K=16, V=16, variant=variant, dtype=torch.float32, device=DEVICE)
    o, final_S, final_A = call(precond_delta_rule, inp, output_final_state=True, backend=backend)
    nodes = list(_custom_nodes(o.grad_fn))
    assert nodes or backend == "torch", "expected the Triton path to build custom autograd nodes"
    for node in nodes:
        leaked = [(name, tuple(t.shape)) for name, value in vars(node).items() for t in _tensors_held(value)]
        assert not leaked, f"{type(node).__name__} keeps tensors on ctx (use save_for_backward): {leaked}"


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_checkpointed_op_matches_plain(variant):
    """Gradients through a non-reentrant checkpoint equal the plain ones (the WY outputs remade from remade
    inputs in backward)."""
    inp = make_inputs(T=150, H=2, HV=4, K=16, V=16, variant=variant, dtype=torch.float32, device=DEVICE)

    def op(*args, **kw):
        return checkpoint(lambda *a: precond_delta_rule(*a, **kw), *args, use_reentrant=False)

    plain_out, plain_grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    ckpt_out, ckpt_grads = outputs_and_grads(op, inp, output_final_state=True, backend="triton")
    for a, b in zip(ckpt_out, plain_out):
        assert rel_rms(a, b) < 1e-6
    for name in plain_grads:
        assert rel_rms(ckpt_grads[name], plain_grads[name]) < 1e-6, name
