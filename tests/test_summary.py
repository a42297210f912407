"""Affine summaries compose associatively, and splitting a sequence anywhere changes nothing."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdelta_cp import precond_delta_rule
from pdelta_cp.chunk.summary import DENSE, DIAGONAL
from pdelta_cp.testing import SEQUENCE_ARGS, call, make_inputs, rel_rms


def _random_maps(kind, n, seed, K=5, V=3):
    gen = torch.Generator().manual_seed(seed)
    if kind.dense:
        return torch.randn(n, K, K, generator=gen, dtype=torch.float64) * 0.5, \
            torch.randn(n, K, V, generator=gen, dtype=torch.float64)
    return torch.rand(n, K, generator=gen, dtype=torch.float64), torch.randn(n, K, generator=gen, dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(dense=st.booleans(), seed=st.integers(0, 10_000))
def test_composition_is_associative(dense, seed):
    kind = DENSE if dense else DIAGONAL
    M, b = _random_maps(kind, 3, seed)
    m = [(M[i], b[i]) for i in range(3)]
    left = kind.compose(kind.compose(m[0], m[1]), m[2])
    right = kind.compose(m[0], kind.compose(m[1], m[2]))
    assert rel_rms(left[0], right[0]) < 1e-13 and rel_rms(left[1], right[1]) < 1e-13


@settings(max_examples=30, deadline=None)
@given(dense=st.booleans(), n=st.integers(1, 17), seed=st.integers(0, 10_000))
def test_tree_reduction_equals_sequential_application(dense, n, seed):
    kind = DENSE if dense else DIAGONAL
    M, b = _random_maps(kind, n, seed)
    state = torch.randn(b.shape[1:], dtype=torch.float64)
    expected = state
    for i in range(n):
        expected = kind.apply(M[i], expected) + b[i]
    Mr, br = kind.reduce(M, b)
    assert rel_rms(kind.apply(Mr, state) + br, expected) < 1e-12


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(["pdn", "pgdn", "pkda"]), split=st.integers(1, 149), seed=st.integers(0, 1000))
def test_splitting_anywhere_with_state_passing(variant, split, seed):
    """Running [0, split) then [split, T) from the handed-over S and A equals one run (chunk path)."""
    inp = {n: t.detach() for n, t in make_inputs(T=150, H=2, HV=4, K=8, V=8, variant=variant, seed=seed).items()}
    o, S, A = call(precond_delta_rule, inp, output_final_state=True)
    first = {n: (t[:, :split] if n in SEQUENCE_ARGS else t) for n, t in inp.items()}
    second = {n: (t[:, split:] if n in SEQUENCE_ARGS else t) for n, t in inp.items()}
    o1, S1, A1 = call(precond_delta_rule, first, output_final_state=True)
    second["initial_state"], second["initial_A_state"] = S1, A1
    o2, S2, A2 = call(precond_delta_rule, second, output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o) < 1e-11
    assert rel_rms(S2, S) < 1e-11 and rel_rms(A2, A) < 1e-11
