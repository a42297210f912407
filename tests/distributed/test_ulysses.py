"""The head all-to-all baseline equals one process (and hence our state-passing CP)."""
import pytest
import torch
import torch.distributed as dist

from pdelta_cp import precond_delta_rule
from pdelta_cp.cp.layout import shard
from pdelta_cp.cp.ulysses import ulysses_precond_delta_rule
from pdelta_cp.testing import SEQUENCE_ARGS, make_inputs, rel_rms

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ulysses_matches_single_process(cp_groups, cp, variant):
    if cp not in cp_groups:
        pytest.skip(f"world size does not hold CP={cp}")
    group, rank = cp_groups[cp]
    inp = make_inputs(B=2, T=64, H=4, HV=8, K=8, V=8, variant=variant, states=False)
    args = [inp.get(n) for n in SEQUENCE_ARGS]
    ref = precond_delta_rule(*args, log_atk_scale=inp["log_atk_scale"])[0]
    dref = torch.autograd.grad((ref * ref).sum(), list(inp.values()))
    local = [None if t is None else shard(t, cp, rank) for t in args]
    o = ulysses_precond_delta_rule(*local, cp_group=group, log_atk_scale=inp["log_atk_scale"])
    grads = torch.autograd.grad((o * o).sum(), list(inp.values()))
    errors = {"o": rel_rms(o, shard(ref, cp, rank))}
    for n, g, r in zip(inp, grads, dref):
        g = g.clone()
        dist.all_reduce(g, group=group)
        errors[n] = rel_rms(g, r)
    bad = {k: e for k, e in errors.items() if not e < 1e-10}
    assert not bad, bad
