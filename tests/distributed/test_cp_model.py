"""The whole language model under CP: logits and every parameter gradient equal the single-process model."""
import pytest
import torch
import torch.distributed as dist

from pdelta_cp.cp.layout import shard
from pdelta_cp.model import LanguageModel, ModelConfig
from pdelta_cp.testing import rel_rms, tensors_on_ctx

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("variant,attention_every", [("pgdn", 0), ("pkda", 0), ("pdn", 0), ("pgdn", 2)])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("cp", [2, 4])
def test_model_cp_matches_single_process(cp_groups, cp, layout, variant, attention_every):
    """attention_every=2: a hybrid with softmax attention as the second layer (CP by key/value all-gather)."""
    if cp not in cp_groups:
        pytest.skip(f"world size does not hold CP={cp}")
    group, rank = cp_groups[cp]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, head_dim=16, num_v_heads=4,
                      variant=variant, attention_every=attention_every)
    model = LanguageModel(cfg).double()
    tokens = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 48, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    logits = model(tokens)
    ref = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    local = model(shard(tokens, cp, rank, layout), cp_group=group, cp_layout=layout)
    grads = torch.autograd.grad((local * shard(weights, cp, rank, layout)).sum(), list(model.parameters()))
    errors = {"logits": rel_rms(local, shard(logits, cp, rank, layout))}
    for (name, _), g, r in zip(model.named_parameters(), grads, ref):  # all collectives before any assert
        g = g.clone()
        dist.all_reduce(g, group=group)
        errors[name] = rel_rms(g, r)
    bad = {n: e for n, e in errors.items() if not e < 1e-9}
    assert not bad, bad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_cp_keeps_no_tensor_on_ctx(cp_groups, backend):
    """Per-block recompute frees only what goes through save_for_backward: no custom Function of the model under
    CP (op, CP hand-off, convolution halo, collectives) may keep a tensor on ctx (tensors_on_ctx), before or
    after backward."""
    if 2 not in cp_groups:
        pytest.skip("world size does not hold CP=2")
    if backend == "triton":
        pytest.importorskip("triton")
    group, rank = cp_groups[2]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=2, head_dim=16, variant="pgdn")
    model = LanguageModel(cfg)
    tokens = torch.randint(0, 50, (1, 256), generator=torch.Generator().manual_seed(1))
    logits = model(shard(tokens, 2, rank, "zigzag"), cp_group=group, cp_layout="zigzag", backend=backend)
    leaks = tensors_on_ctx(logits)
    logits.sum().backward()  # every rank joins the backward collectives before any assert
    assert not leaks, leaks
    # nor after backward: the graph lives until the whole backward ends, so what a layer's backward leaves on
    # ctx (e.g. the WY outputs it remade) piles up over all layers
    assert not tensors_on_ctx(logits), tensors_on_ctx(logits)
