"""Triton state pass (interpreter on CPU, compiled on GPU) against the PyTorch chunk-by-chunk scan."""
import pytest
import torch

triton = pytest.importorskip("triton")

from pdelta_cp.chunk.plan import make_chunk_plan, scan_chunks  # noqa: E402
from pdelta_cp.kernels.state_pass import state_pass  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _step(W, U, P, D):
    def step(ids, S):
        return D[ids][..., None] * S + P[ids].mT @ (U[ids] - W[ids] @ S)
    return step


def _out_of_resources(stage: str, narrow_fits: bool):
    """A fake kernel launcher that overflows shared memory in ``stage`` (forward|backward), as K=256 does."""
    from triton.runtime.errors import OutOfResources

    from pdelta_cp.kernels import state_pass as sp

    real = {"forward": sp.state_forward, "backward": sp.state_backward}[stage]

    def launch(*args, narrow=False, **kwargs):
        if not (narrow and narrow_fits):
            raise OutOfResources(278528, 232448, "shared memory")
        return real(*args, narrow=narrow, **kwargs)

    return launch


@pytest.mark.parametrize("split_backward", [False, True], ids=["partials", "split"])
@pytest.mark.parametrize("K,V", [(16, 32), (20, 12), (16, 72)])  # V=72: several V tiles, the last one masked
@pytest.mark.parametrize("sub_len", [100, 2])
def test_state_pass_matches_scan(K, V, sub_len, split_backward, monkeypatch):
    """split: PDELTA_STATE_BWD_SPLIT=1, the reverse pass stores adjoints and a parallel kernel forms dW, dU, dP̃, dd."""
    monkeypatch.setenv("PDELTA_STATE_BWD_SPLIT", "1" if split_backward else "0")
    _check_state_pass(K, V, sub_len)


@pytest.mark.parametrize("stage", ["forward", "backward"])
@pytest.mark.parametrize("narrow_fits", [True, False])
def test_state_pass_survives_shared_memory_overflow(monkeypatch, stage, narrow_fits):
    """A kernel too big for the GPU retries with a thin V tile, then falls back to PyTorch: same answers."""
    from pdelta_cp.kernels import state_pass as sp

    monkeypatch.setattr(sp, f"state_{stage}", _out_of_resources(stage, narrow_fits))
    from pdelta_cp.kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "_warned", set())
    with pytest.warns(RuntimeWarning, match="does not fit") if not narrow_fits else _no_warning():
        _check_state_pass(16, 32, 2)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _check_state_pass(K, V, sub_len):
    """Outputs and all five gradients; sub_len=2 exercises the segment-parallel summaries and folds."""
    gen = torch.Generator().manual_seed(0)
    HV, C = 2, 64
    plan = make_chunk_plan([(0, 300), (300, 310), (310, 600)], 600, C, DEVICE)
    Nc = plan.num_chunks

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(DEVICE).requires_grad_(True)

    W, U, P = rnd(Nc, HV, C, K, scale=0.1), rnd(Nc, HV, C, V), rnd(Nc, HV, C, K, scale=0.1)
    D = torch.rand(Nc, HV, K, generator=gen).to(DEVICE).requires_grad_(True)
    S0 = rnd(3, HV, K, V)
    leaves = (W, U, P, D, S0)
    ref_starts, ref_final = scan_chunks(plan, S0, _step(W, U, P, D))
    gs, gf = torch.randn_like(ref_starts), torch.randn_like(ref_final)
    ref_grads = torch.autograd.grad((ref_starts * gs).sum() + (ref_final * gf).sum(), leaves)
    starts, final, _ = state_pass(W, U, P, D, S0, plan.seg_first_chunk, plan.seg_num_chunks, sub_len=sub_len)
    grads = torch.autograd.grad((starts * gs).sum() + (final * gf).sum(), leaves)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_rms(starts, ref_starts) < tol and rel_rms(final, ref_final) < tol
    for name, a, b in zip("W U P D S0".split(), grads, ref_grads):
        assert rel_rms(a, b) < tol, (name, rel_rms(a, b))


@pytest.mark.parametrize("grads_kernel_fits", [True, False])
def test_split_backward_writes_the_adjoints_over_g_and_adds_into_the_left_gradients(grads_kernel_fits, monkeypatch):
    """reuse_g: the adjoints Λ overwrite G (dead once the reverse pass has read it); add_to: dW and dU are added
    into the given tensors (the output stage's, stages.GradHandoff), which come back holding the sums. Everything
    equals the fresh computation — also when the gradient kernel does not fit and its PyTorch form adds instead."""
    import pdelta_cp.kernels.state_pass as sp
    from triton.runtime.errors import OutOfResources

    gen = torch.Generator().manual_seed(3)
    Nc, HV, C, K, V = 3, 1, 64, 128, 128
    W, P = (torch.randn(Nc, HV, C, K, generator=gen).to(DEVICE) * 0.1 for _ in range(2))
    U = torch.randn(Nc, HV, C, V, generator=gen).to(DEVICE)
    D = torch.rand(Nc, HV, K, generator=gen).to(DEVICE)
    S0 = torch.randn(1, HV, K, V, generator=gen).to(DEVICE)
    starts, *_ = sp.state_forward(W, U, P, D, S0, [0], [Nc])
    G = torch.randn(Nc, HV, K, V, generator=gen).to(DEVICE)
    terminal = torch.randn(1, HV, K, V, generator=gen).to(DEVICE)
    left_W, left_U = torch.randn(Nc, HV, C, K, generator=gen).to(DEVICE), torch.randn(Nc, HV, C, V, generator=gen).to(
        DEVICE)
    fresh = sp.state_backward(W, U, P, D, starts, G.clone(), terminal, [0], [Nc])
    if not grads_kernel_fits:
        real = sp.launch_or_fallback

        def grads_too_big(name, launch):
            if name != "state_grads":
                return real(name, launch)
            return real(name, lambda: (_ for _ in ()).throw(OutOfResources(1, 0, "shared")))
        monkeypatch.setattr(sp, "launch_or_fallback", grads_too_big)
    G_reused, into = G.clone(), (left_W.clone(), left_U.clone())
    got = sp.state_backward(W, U, P, D, starts, G_reused, terminal, [0], [Nc], reuse_g=True, add_to=into)
    assert got[0] is into[0] and got[1] is into[1]
    tol = 1e-6 if grads_kernel_fits else 1e-5  # the PyTorch form sums in its own order
    assert rel_rms(got[0], fresh[0] + left_W) <= tol and rel_rms(got[1], fresh[1] + left_U) <= tol
    for a, b in zip(got[2:], fresh[2:]):
        assert rel_rms(a, b) <= tol
    assert not torch.equal(G_reused, G)  # it holds the adjoints now


def test_state_pass_leaves_a_callers_gradient_alone():
    """Without reuse_grad (the default for callers outside the op's pipeline) the gradient handed to backward is
    read, never written."""
    gen = torch.Generator().manual_seed(4)
    HV, C, K, V = 2, 64, 16, 16
    plan = make_chunk_plan([(0, 320)], 320, C, DEVICE)
    Nc = plan.num_chunks
    W, P = (torch.randn(Nc, HV, C, K, generator=gen).mul(0.1).to(DEVICE).requires_grad_(True) for _ in range(2))
    U = torch.randn(Nc, HV, C, V, generator=gen).to(DEVICE).requires_grad_(True)
    D = torch.rand(Nc, HV, K, generator=gen).to(DEVICE).requires_grad_(True)
    S0 = torch.randn(1, HV, K, V, generator=gen).to(DEVICE)
    starts, *_ = state_pass(W, U, P, D, S0, plan.seg_first_chunk, plan.seg_num_chunks)
    gs = torch.randn_like(starts)
    kept = gs.clone()
    torch.autograd.grad(starts, (W, U, P, D), gs)
    assert torch.equal(gs, kept)
