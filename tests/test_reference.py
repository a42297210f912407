"""The per-token reference against independent formulations of the same recurrences (float64)."""
import math

import pytest
import torch

from pdelta_cp.reference import naive_precond_delta_rule
from pdelta_cp.testing import SEQUENCE_ARGS, make_inputs, rel_rms

TOL = 1e-12


def _call(inp, **kw):
    return naive_precond_delta_rule(*[inp.get(n) for n in SEQUENCE_ARGS], **{
        "initial_state": inp.get("initial_state"), "initial_A_state": inp.get("initial_A_state"),
        "log_atk_scale": inp.get("log_atk_scale", -0.2), **kw})


def _closed_form(inp, x=1.5, eps=1e-6):
    """S_t = Diag(α_t) ... written as explicit K x K transition matrices, one sequence, GVA groups of 1."""
    q, k, v, beta = inp["q"][0], inp["k"][0], inp["v"][0], inp["beta"][0]
    g_atk, beta_atk, g, c = inp["g_atk"][0], inp["beta_atk"][0], inp.get("g"), inp["log_atk_scale"]
    T, H, K = q.shape
    S = inp["initial_state"][0].clone()
    A = inp["initial_A_state"][0].clone()
    outs = []
    for t in range(T):
        kh = k[t] / torch.sqrt((k[t] ** 2).sum(-1, keepdim=True) + 1e-6)
        qh = q[t] / torch.sqrt((q[t] ** 2).sum(-1, keepdim=True) + 1e-6) * K ** -0.5
        A = torch.exp(g_atk[t])[:, None] * A + beta_atk[t][:, None] * kh ** 2
        r = torch.log(A + eps) - c[:, None]
        p = kh * x ** (-(r / (1 + r.abs())))
        o_t = []
        for h in range(H):
            if g is None:
                alpha = torch.eye(K, dtype=q.dtype)
            elif g.dim() == 3:
                alpha = torch.exp(g[0, t, h]) * torch.eye(K, dtype=q.dtype)
            else:
                alpha = torch.diag(torch.exp(g[0, t, h]))
            transition = (torch.eye(K, dtype=q.dtype) - beta[t, h] * torch.outer(p[h], kh[h])) @ alpha
            S_h = transition @ S[h] + beta[t, h] * torch.outer(p[h], v[t, h])
            S = torch.cat([S[:h], S_h[None], S[h + 1:]])
            o_t.append(S_h.T @ qh[h])
        outs.append(torch.stack(o_t))
    return torch.stack(outs)[None], S, A


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
def test_reference_matches_closed_form(variant):
    inp = make_inputs(T=20, H=2, K=8, V=4, variant=variant)
    o, S, A = _call(inp, output_final_state=True)
    o2, S2, A2 = _closed_form({k: t.detach() for k, t in inp.items()})
    assert rel_rms(o, o2) < TOL and rel_rms(S[0], S2) < TOL and rel_rms(A[0], A2) < TOL


def test_x_equal_one_is_plain_gated_delta_rule():
    inp = {k: t.detach() for k, t in make_inputs(T=30, H=2, K=8, V=4, variant="pgdn").items()}
    o, S, _ = _call(inp, x=1.0, output_final_state=True)
    # plain GDN: write key = read key
    q, k, v, beta, g = inp["q"][0], inp["k"][0], inp["v"][0], inp["beta"][0], inp["g"][0]
    S2 = inp["initial_state"][0].clone()
    outs = []
    for t in range(q.shape[0]):
        kh = k[t] / torch.sqrt((k[t] ** 2).sum(-1, keepdim=True) + 1e-6)
        qh = q[t] / torch.sqrt((q[t] ** 2).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
        S2 = torch.exp(g[t])[:, None, None] * S2
        delta = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", S2, kh))
        S2 = S2 + kh[:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hkv,hk->hv", S2, qh))
    assert rel_rms(o[0], torch.stack(outs)) < TOL and rel_rms(S[0], S2) < TOL


def test_multiplier_range_and_centre():
    """m lies in (1/x, x) and equals 1 where A = e^c (checked through p / k̂ on a one-token sequence)."""
    inp = {k: t.detach() for k, t in make_inputs(T=1, H=1, K=4, V=4, variant="pdn", states=False).items()}
    c = math.log(0.3)
    inp["log_atk_scale"] = torch.tensor([c], dtype=torch.float64)
    inp["beta"] = torch.ones_like(inp["beta"])
    inp["v"] = torch.zeros_like(inp["v"])
    A0 = torch.tensor([[[0.3, 0.0, 1e6, 1e-9]]], dtype=torch.float64)
    inp["g_atk"] = torch.zeros_like(inp["g_atk"])
    inp["beta_atk"] = torch.zeros_like(inp["beta_atk"])
    # with v = 0, beta = 1 and S0 = I-like, S1 = S0 - p k̂^T S0: recover p from S1
    S0 = torch.eye(4, dtype=torch.float64)[None, None].expand(1, 1, 4, 4).clone()
    _, S1, _ = _call(inp, initial_state=S0, initial_A_state=A0, output_final_state=True)
    kh = inp["k"][0, 0, 0] / torch.sqrt((inp["k"][0, 0, 0] ** 2).sum() + 1e-6)
    outer = (S0[0, 0] - S1[0, 0])  # = p k̂^T
    p = outer @ kh / (kh @ kh)
    m = p / kh
    assert abs(m[0] - 1) < 1e-5  # A = e^c -> m = 1
    assert 1 / 1.5 < m[2] < 1 and 1 < m[3] < 1.5  # huge A -> near 1/x, tiny A -> near x


def test_splitting_a_sequence_with_states_is_exact():
    inp = {k: t.detach() for k, t in make_inputs(T=50, H=2, HV=4, K=8, V=4, variant="pkda").items()}
    o, S, A = _call(inp, output_final_state=True)
    first = {k: (t[:, :21] if k in SEQUENCE_ARGS else t) for k, t in inp.items()}
    second = {k: (t[:, 21:] if k in SEQUENCE_ARGS else t) for k, t in inp.items()}
    o1, S1, A1 = _call(first, output_final_state=True)
    second["initial_state"], second["initial_A_state"] = S1, A1
    o2, S2, A2 = _call(second, output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o) < TOL and rel_rms(S2, S) < TOL and rel_rms(A2, A) < TOL


def test_varlen_equals_separate_sequences():
    inp = {k: t.detach() for k, t in make_inputs(T=40, H=2, K=8, V=4, variant="pgdn", num_sequences=3).items()}
    cu = [0, 7, 30, 40]
    o, S, A = _call(inp, cu_seqlens=torch.tensor(cu), output_final_state=True)
    for n in range(3):
        part = {k: (t[:, cu[n]:cu[n + 1]] if k in SEQUENCE_ARGS else t) for k, t in inp.items()}
        part["initial_state"] = inp["initial_state"][n:n + 1]
        part["initial_A_state"] = inp["initial_A_state"][n:n + 1]
        on, Sn, An = _call(part, output_final_state=True)
        assert rel_rms(on, o[:, cu[n]:cu[n + 1]]) < TOL
        assert rel_rms(Sn[0], S[n]) < TOL and rel_rms(An[0], A[n]) < TOL
