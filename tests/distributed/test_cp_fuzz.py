"""Fuzzed CP calls (hypothesis, identical examples on every rank): valid ones match one process, invalid ones
raise the same clear error on every rank — nobody hangs. Shrinking is off so that ranks never diverge."""
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pdelta_cp import precond_delta_rule
from pdelta_cp.cp.layout import shard
from pdelta_cp.testing import SEQUENCE_ARGS, call, make_inputs, output_weights, rel_rms, weighted_loss

pytestmark = pytest.mark.distributed
COUNTS = {"valid": 0, "invalid": 0}

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw, world):
    layout = draw(st.sampled_from(["contiguous", "zigzag"]))
    per = 2 if layout == "zigzag" else 1
    local = draw(st.integers(1, 40)) * per  # tokens per rank (tiny pieces included)
    T = local * world
    H = draw(st.integers(1, 2))
    HV = H * draw(st.integers(1, 2))
    K, V = draw(st.sampled_from([4, 8, 12])), draw(st.sampled_from([4, 8]))
    varlen = draw(st.booleans())
    cu = None
    if varlen:
        cuts = draw(st.lists(st.integers(1, T - 1), max_size=6)) if T > 1 else []
        cu = sorted({0, T, *cuts})
    return dict(variant=draw(st.sampled_from(["pdn", "pgdn", "pkda"])), layout=layout, T=T, B=1 if varlen else
                draw(st.integers(1, 2)), H=H, HV=HV, K=K, V=V, cu=cu, states=draw(st.booleans()),
                bad=draw(st.sampled_from([None, None, None, "odd_local", "wrong_cu", "heads"])))


def _run(group, world, rank, p):
    N = len(p["cu"]) - 1 if p["cu"] else p["B"]
    inp = make_inputs(B=p["B"], T=p["T"], H=p["H"], HV=p["HV"], K=p["K"], V=p["V"], variant=p["variant"],
                      num_sequences=N, states=p["states"], seed=p["T"] * 7 + p["K"])
    cu = None if p["cu"] is None else torch.tensor(p["cu"])
    local = {n: (shard(t, world, rank, p["layout"]) if n in SEQUENCE_ARGS else t) for n, t in inp.items()}
    if p["bad"] == "odd_local" and p["layout"] == "zigzag":
        local = {n: (t[:, 1:] if n in SEQUENCE_ARGS else t) for n, t in local.items()}
    if p["bad"] == "wrong_cu":
        cu = torch.tensor([0, p["T"] + 1])
    if p["bad"] == "heads" and rank == world - 1:
        local["beta"] = local["beta"][..., :1].expand(*local["beta"].shape[:-1], p["HV"] + 1).clone()
    expect_error = p["bad"] in ("wrong_cu", "heads") or (p["bad"] == "odd_local" and p["layout"] == "zigzag")
    COUNTS["invalid" if expect_error else "valid"] += 1
    if expect_error:
        with pytest.raises((ValueError, RuntimeError)):
            call(precond_delta_rule, local, cu_seqlens=cu, output_final_state=True, cp_group=group,
                 cp_layout=p["layout"])
        return
    ref = call(precond_delta_rule, inp, cu_seqlens=cu, output_final_state=True)
    w = output_weights(*ref)
    names = list(inp)
    ref_grads = torch.autograd.grad(weighted_loss(ref, w), [inp[n] for n in names])
    out = call(precond_delta_rule, local, cu_seqlens=cu, output_final_state=True, cp_group=group,
               cp_layout=p["layout"])
    grads = torch.autograd.grad(weighted_loss(out, [shard(w[0], world, rank, p["layout"])] + w[1:]),
                                [inp[n] for n in names])
    o_full = torch.zeros_like(ref[0])
    o_full[:, shard(torch.arange(p["T"])[None], world, rank, p["layout"])[0]] = out[0].detach()
    dist.all_reduce(o_full, group=group)
    errors = {"o": rel_rms(o_full, ref[0]), "S": rel_rms(out[1], ref[1]), "A": rel_rms(out[2], ref[2])}
    for n, g, r in zip(names, grads, ref_grads):
        g = g.clone()
        dist.all_reduce(g, group=group)
        errors["d" + n] = rel_rms(g, r)
    bad = {k: e for k, e in errors.items() if not e < 1e-9}
    assert not bad, (p, bad)


@pytest.mark.parametrize("cp", [2, 4])
def test_fuzzed_cp_calls(cp_groups, cp):
    if cp not in cp_groups:
        pytest.skip(f"world size does not hold CP={cp}")
    group, rank = cp_groups[cp]

    @SETTINGS
    @given(p=problems(cp))
    def check(p):
        _run(group, cp, rank, p)

    COUNTS.update(valid=0, invalid=0)
    check()
    assert COUNTS["valid"] >= 10 and COUNTS["invalid"] >= 2, COUNTS  # the fuzzing really ran both kinds
