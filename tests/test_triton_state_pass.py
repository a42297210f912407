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
    starts, final = state_pass(W, U, P, D, S0, plan.seg_first_chunk, plan.seg_num_chunks, sub_len=sub_len)
    grads = torch.autograd.grad((starts * gs).sum() + (final * gf).sum(), leaves)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_rms(starts, ref_starts) < tol and rel_rms(final, ref_final) < tol
    for name, a, b in zip("W U P D S0".split(), grads, ref_grads):
        assert rel_rms(a, b) < tol, (name, rel_rms(a, b))


def test_split_backward_places_dw_du_in_the_dead_state_gradient():
    """reuse_g: dW and dU live in G's storage (dead once the reverse pass has read it) and equal the fresh ones;
    dP, dd and dS_enter too. K = V = 128, C = 64: G holds K·V floats per chunk and head, exactly dW's C·K and
    dU's C·V."""
    from pdelta_cp.kernels.state_pass import state_backward, state_forward

    gen = torch.Generator().manual_seed(3)
    Nc, HV, C, K, V = 3, 1, 64, 128, 128
    W, P = (torch.randn(Nc, HV, C, K, generator=gen).to(DEVICE) * 0.1 for _ in range(2))
    U = torch.randn(Nc, HV, C, V, generator=gen).to(DEVICE)
    D = torch.rand(Nc, HV, K, generator=gen).to(DEVICE)
    S0 = torch.randn(1, HV, K, V, generator=gen).to(DEVICE)
    starts, _ = state_forward(W, U, P, D, S0, [0], [Nc])
    G = torch.randn(Nc, HV, K, V, generator=gen).to(DEVICE)
    terminal = torch.randn(1, HV, K, V, generator=gen).to(DEVICE)
    fresh = state_backward(W, U, P, D, starts, G.clone(), terminal, [0], [Nc])
    G_reused = G.clone()
    reused = state_backward(W, U, P, D, starts, G_reused, terminal, [0], [Nc], reuse_g=True)
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    storage = G_reused.untyped_storage().data_ptr()
    assert reused[0].untyped_storage().data_ptr() == storage and reused[1].untyped_storage().data_ptr() == storage
    assert reused[2].untyped_storage().data_ptr() != storage  # dP does not fit: a buffer of its own


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
    starts, _ = state_pass(W, U, P, D, S0, plan.seg_first_chunk, plan.seg_num_chunks)
    gs = torch.randn_like(starts)
    kept = gs.clone()
    torch.autograd.grad(starts, (W, U, P, D), gs)
    assert torch.equal(gs, kept)
