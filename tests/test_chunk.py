"""The chunkwise PyTorch path (backend="torch") against the per-token reference: every output and gradient."""
import pytest
import torch

from pdelta_cp import precond_delta_rule
from pdelta_cp.reference import naive_precond_delta_rule
from pdelta_cp.testing import call, make_inputs, output_weights, outputs_and_grads, rel_rms, weighted_loss

CASES = [  # (B, T, H, HV, K, V, cu_seqlens)
    (2, 150, 2, 2, 16, 8, None),  # T not a multiple of the chunk size
    (1, 64, 1, 1, 8, 8, None),  # exactly one chunk
    (1, 200, 2, 4, 12, 10, [0, 1, 70, 130, 200]),  # varlen, a 1-token sequence, grouped value heads
    (1, 300, 2, 2, 16, 16, [0, 64, 65, 300]),  # sequence boundaries on and next to a chunk boundary
]


def _compare(variant, case, dtype, tol, zero_grads=(), **kw):
    B, T, H, HV, K, V, cu = case
    N = len(cu) - 1 if cu else B
    inp = make_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, variant=variant, dtype=dtype, num_sequences=N)
    cu_t = None if cu is None else torch.tensor(cu)
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True,
                                           cu_seqlens=cu_t, **kw)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, cu_seqlens=cu_t,
                                   backend="torch", **kw)
    for name, a, b in zip(("o", "final_S", "final_A"), out, ref_out):
        assert rel_rms(a, b) < tol, (name, rel_rms(a, b))
    assert set(grads) == set(ref_grads)
    for name in grads:
        if name in zero_grads:  # no dependence: both must be exactly zero
            assert ref_grads[name].abs().sum() == 0 and grads[name].abs().sum() == 0, name
            continue
        assert ref_grads[name].abs().sum() > 0, f"d{name} of the reference is zero: the test would be vacuous"
        assert rel_rms(grads[name], ref_grads[name]) < tol, (f"d{name}", rel_rms(grads[name], ref_grads[name]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}HV{c[3]}{'varlen' if c[6] else ''}")
@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
def test_chunk_matches_reference_float64(variant, case):
    _compare(variant, case, torch.float64, 1e-10)


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
def test_chunk_float32_against_float64_reference(variant):
    _compare(variant, CASES[2], torch.float32, 2e-5)


def test_options_qk_unnormalised_scale_x1_and_fixed_centre():
    # x = 1: the multiplier is 1, so only the final A depends on the preconditioner and the centre is unused
    _compare("pgdn", CASES[0], torch.float64, 1e-10, qk_l2norm=False, scale=0.3, x=1.0, eps=1e-3,
             zero_grads={"log_atk_scale"})
    _compare("pkda", CASES[2], torch.float64, 1e-10, qk_l2norm=False, scale=0.3, x=2.0, eps=1e-3)


def test_without_initial_states_and_final_states_off():
    inp = make_inputs(T=100, variant="pkda", states=False)
    o, S, A = precond_delta_rule(*[inp.get(n) for n in ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")])
    assert S is None and A is None
    o2, _, _ = naive_precond_delta_rule(*[inp.get(n) for n in ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")])
    assert rel_rms(o, o2) < 1e-10


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_strong_decay_does_not_overflow(variant):
    """Per-token log-decays near -30 (Γ far below -88 inside a chunk) must not produce inf/NaN."""
    inp = make_inputs(T=128, variant=variant, decay_strength=30.0)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True)
    ref_inp = {n: t.detach().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True)
    assert all(torch.isfinite(t).all() for t in list(out) + list(grads.values()))
    assert rel_rms(out[0], ref_out[0]) < 1e-10
    assert all(rel_rms(grads[n], ref_grads[n]) < 1e-9 for n in grads)


def test_bf16_inputs_give_bf16_output_and_fp32_states():
    inp = make_inputs(T=70, variant="pgdn", dtype=torch.bfloat16)
    o, S, A = precond_delta_rule(*[inp.get(n) for n in ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")],
                                 output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32 and A.dtype == torch.float32


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_enclosing_bf16_autocast_changes_nothing(variant):
    """Mixed-precision training runs the model's forward under autocast; the op keeps its float32 chunk math:
    bitwise the same outputs and gradients as without autocast (backward outside the region, as PyTorch asks)."""
    inp = make_inputs(T=70, variant=variant, dtype=torch.float32)
    plain_out, plain_grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(precond_delta_rule, inp, output_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(out, plain_out))
    names = list(plain_grads)
    grads = torch.autograd.grad(weighted_loss(out, output_weights(*out)), [inp[n] for n in names])
    assert all(torch.equal(gr, plain_grads[n]) for n, gr in zip(names, grads))
