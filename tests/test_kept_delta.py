"""Δ = U − W S kept by the state pass (state_pass.keeps_delta, the default since session o) and read by the output
stage and the chunk-gradient kernel instead of formed from W, U and S again."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.reference import naive_precond_delta_rule  # noqa: E402
from pdelta_cp.testing import make_inputs, outputs_and_grads, rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_LIMITS = {"o": 5e-3, "final_S": 5e-3, "final_A": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "initial_state": 8e-3,
              "initial_A_state": 8e-3}  # tests/test_gpu.py's; gates, gains and centres 2e-2


def _triton(inp):
    return outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")


def _kept_deltas(monkeypatch, corrupt: bool = False) -> list:
    """Record every Δ the state pass returns (None: not kept); with ``corrupt``, add 1 to it in place, so that any
    reader of the kept Δ gives a visibly different answer."""
    import pdelta_cp.kernels.state_pass as sp

    seen = []
    real = sp.state_forward

    def spy(*args, **kwargs):
        starts, final, delta = real(*args, **kwargs)
        if not kwargs.get("summary", False):
            seen.append(delta)
            if corrupt and delta is not None:
                delta.add_(1.0)
        return starts, final, delta

    monkeypatch.setattr(sp, "state_forward", spy)
    return seen


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_kept_delta_is_what_the_readers_use(variant, monkeypatch):
    """With Δ kept, the outputs and the gradients move when the kept Δ is corrupted (the readers take it, not U −
    W S); with PDELTA_KEEP_DELTA=0 nothing is kept and the same corruption hook changes nothing. Float32 inputs: Δ
    is kept in float32 and the answers match the formed-again path to float32 roundoff."""
    inp = make_inputs(T=200, H=2, HV=4, K=16, V=24, variant=variant, dtype=torch.float32, device=DEVICE)
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")
    out_formed, grads_formed = _triton(inp)
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "1")
    seen = _kept_deltas(monkeypatch)
    out_kept, grads_kept = _triton(inp)
    assert seen and all(d is not None and d.dtype == torch.float32 for d in seen)
    assert all(rel_rms(a, b) < 1e-6 for a, b in zip(out_kept, out_formed))
    assert all(rel_rms(grads_kept[n], grads_formed[n]) < 1e-6 for n in grads_kept)

    monkeypatch.undo()
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "1")
    _kept_deltas(monkeypatch, corrupt=True)
    out_bad, grads_bad = _triton(inp)
    assert rel_rms(out_bad[0], out_kept[0]) > 1e-2  # the output stage read Δ
    assert rel_rms(grads_bad["k"], grads_kept["k"]) > 1e-2  # and backward did
    assert torch.equal(out_bad[1], out_kept[1])  # the final state never depends on the kept copy

    monkeypatch.undo()
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")
    seen = _kept_deltas(monkeypatch, corrupt=True)
    out_off, _ = _triton(inp)
    assert seen and all(d is None for d in seen)
    assert torch.equal(out_off[0], out_formed[0])


@pytest.mark.parametrize("variant,strength", [("pdn", 1.0), ("pgdn", 0.05), ("pkda", 0.05)])
def test_kept_delta_in_bf16_stays_within_the_gpu_limits(variant, strength, monkeypatch):
    """bf16 inputs: Δ is kept in bfloat16 (the states' storage, as fla keeps v_new), with varlen and GVA; every
    output and gradient stays within tests/test_gpu.py's limits of float64."""
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "1")
    seen = _kept_deltas(monkeypatch)
    inp = make_inputs(T=300, H=2, HV=4, K=32, V=48, variant=variant, dtype=torch.bfloat16, device=DEVICE,
                      decay_strength=strength, num_sequences=2)
    cu = torch.tensor([0, 70, 300], device=DEVICE)
    ref = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref, output_final_state=True, cu_seqlens=cu)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, cu_seqlens=cu, backend="triton")
    assert seen and all(d is not None and d.dtype == torch.bfloat16 for d in seen)
    errors = {n: rel_rms(a, b) for n, a, b in zip(("o", "final_S", "final_A"), out, ref_out)}
    errors.update({n: rel_rms(grads[n], ref_grads[n]) for n in grads})
    assert all(e < GPU_LIMITS.get(n, 2e-2) for n, e in errors.items()), errors


def test_kept_delta_not_with_remade_states(monkeypatch):
    """PDELTA_RECOMPUTE_STATES=1 remakes S in backward (for memory): Δ is not kept there."""
    from pdelta_cp.kernels.stages import Recompute
    from pdelta_cp.kernels.state_pass import keeps_delta

    monkeypatch.delenv("PDELTA_KEEP_DELTA", raising=False)
    plain, remade = Recompute(lambda: None), Recompute(lambda: None, states=True)
    assert keeps_delta(None) and keeps_delta(plain) and not keeps_delta(remade)
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")
    assert not keeps_delta(plain)
    monkeypatch.setenv("PDELTA_RECOMPUTE_STATES", "1")
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "1")
    seen = _kept_deltas(monkeypatch)
    _triton(make_inputs(T=130, H=1, K=16, V=16, variant="pgdn", dtype=torch.float32, device=DEVICE))
    assert seen and all(d is None for d in seen)


def _remade_u(monkeypatch) -> list:
    """Record the U of every WY remake in backward (None: left out, see stages.Recompute.without_u)."""
    from pdelta_cp.kernels.channel import wy_channel_decay
    from pdelta_cp.kernels.wy import wy_scalar_decay

    seen = []
    for stage in (wy_scalar_decay, wy_channel_decay):
        def spy(*args, real=stage.remake, **kwargs):
            out = real(*args, **kwargs)
            seen.append(out[1])
            return out

        monkeypatch.setattr(stage, "remake", spy)
    return seen


@pytest.mark.parametrize("variant", ["pdn", "pkda"])
def test_remake_leaves_u_out_where_backward_reads_the_kept_delta(variant, monkeypatch):
    """Backward's readers take the kept Δ, so the remake does not write U (None in its place): every output and
    gradient is bitwise that of PDELTA_REMAKE_U=1 (float32 inputs, GVA, varlen). U is written where a reader needs
    it: PDELTA_KEEP_DELTA=0 (no Δ) and the one-kernel reverse pass (PDELTA_STATE_BWD_SPLIT=0, which reads U)."""
    inp = make_inputs(T=200, H=2, HV=4, K=16, V=24, variant=variant, dtype=torch.float32, device=DEVICE,
                      num_sequences=2)
    cu = torch.tensor([0, 90, 200], device=DEVICE)

    def run():
        return outputs_and_grads(precond_delta_rule, inp, output_final_state=True, cu_seqlens=cu, backend="triton")

    monkeypatch.setenv("PDELTA_REMAKE_U", "1")
    seen = _remade_u(monkeypatch)
    out_u, grads_u = run()
    assert seen and all(u is not None for u in seen)
    monkeypatch.delenv("PDELTA_REMAKE_U")
    seen.clear()
    out, grads = run()
    assert seen and all(u is None for u in seen)
    assert all(torch.equal(a, b) for a, b in zip(out, out_u))
    assert all(torch.equal(grads[n], grads_u[n]) for n in grads_u), [n for n in grads_u
                                                                     if not torch.equal(grads[n], grads_u[n])]
    for setting in ("PDELTA_KEEP_DELTA", "PDELTA_STATE_BWD_SPLIT"):
        monkeypatch.setenv(setting, "0")
        seen.clear()
        out_needs, grads_needs = run()
        assert seen and all(u is not None for u in seen), setting
        assert all(rel_rms(grads_needs[n], grads_u[n]) < 1e-5 for n in grads_u), setting
        monkeypatch.delenv(setting)


def test_u_left_out_only_where_no_reader_needs_it(monkeypatch):
    """Recompute.without_u: only for the remake that takes ``with_u``, with Δ kept and the split reverse pass
    (K <= 128), and not under PDELTA_REMAKE_U=1; the output stage's PyTorch forward takes it back (keep_u)."""
    from pdelta_cp.kernels.stages import Recompute, u_again

    delta = torch.zeros(1)
    for K, kept, optional, env, expect in [(128, delta, True, None, False), (256, delta, True, None, True),
                                           (128, None, True, None, True), (128, delta, False, None, True),
                                           (128, delta, True, "1", True)]:
        if env is None:
            monkeypatch.delenv("PDELTA_REMAKE_U", raising=False)
        else:
            monkeypatch.setenv("PDELTA_REMAKE_U", env)
        rc = Recompute(lambda *t, with_u=True: with_u, u_optional=optional)
        rc.without_u(kept, K)
        assert rc.u_needed == expect, (K, kept, optional, env)
        if optional:
            assert rc.cache.make(()) == expect  # what the remake is asked for
        rc.keep_u()
        assert rc.u_needed
    W, S, d = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 5, 6), torch.randn(3, 2, 4, 6)
    assert torch.allclose(u_again(None, W, S, d) - W @ S, d, atol=1e-6)
    assert u_again(d, W, S, None) is d
    with pytest.raises(RuntimeError, match="no Δ was kept"):
        u_again(None, W, S, None)
