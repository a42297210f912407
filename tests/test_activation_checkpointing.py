"""The op under activation checkpointing (per-block recompute, as the training presets use it).

Checkpointing frees what autograd saves through ``save_for_backward`` and remakes it in backward; a tensor kept
as an attribute of ``ctx`` escapes that and stays alive for every layer until backward. One such leak (the WY
recompute inputs, 14 KB per token per layer at the 340M shape) made 1M-token training run out of memory.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.testing import (call, custom_autograd_nodes, make_inputs, outputs_and_grads,  # noqa: E402
                               rel_rms, tensors_on_ctx)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_tensor_held_on_ctx(variant, backend, states):
    inp = make_inputs(T=150, H=2, HV=4, K=16, V=16, variant=variant, dtype=torch.float32, device=DEVICE)
    o, _, _ = call(precond_delta_rule, inp, output_final_state=True, backend=backend)
    assert not tensors_on_ctx(o), f"tensors kept on ctx (use save_for_backward): {tensors_on_ctx(o)}"
    if backend == "triton":  # the scan must have looked at the kernels' custom autograd nodes
        assert custom_autograd_nodes(o)


@pytest.fixture(params=["keep", "recompute"])
def states(request, monkeypatch):
    """The chunk states kept for backward (default) or remade there (PDELTA_RECOMPUTE_STATES=1)."""
    if request.param == "recompute":
        monkeypatch.setenv("PDELTA_RECOMPUTE_STATES", "1")
    return request.param


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
def test_no_tensor_held_on_ctx_after_backward(variant, states):
    """The WY outputs (and the chunk states, when remade) remade in backward are dropped once their last reader
    ran: the graph (and every ctx) lives until the whole backward ends, so anything kept there would pile up
    over the layers of a model (this held 12 KB per token per layer at the 340M shape: ~69 of the 115 GiB per
    GPU of the 1M-token run on 4 H200s)."""
    inp = make_inputs(T=150, H=2, HV=4, K=16, V=16, variant=variant, dtype=torch.float32, device=DEVICE)
    o, S, _ = call(precond_delta_rule, inp, output_final_state=True, backend="triton")
    (o.square().sum() + S.square().sum()).backward(retain_graph=True)
    assert not tensors_on_ctx(o), f"tensors kept on ctx after backward: {tensors_on_ctx(o)}"
    first = {n: t.grad.clone() for n, t in inp.items()}
    for t in inp.values():
        t.grad = None
    (o.square().sum() + S.square().sum()).backward()  # a second backward remakes what the first one dropped
    assert all(torch.equal(first[n], inp[n].grad) for n in inp)


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_checkpointed_op_matches_plain(variant, states):
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
