"""precond_delta_rule(backend="triton") against the PyTorch chunk path and the float64 reference."""
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.kernels._triton_utils import WARPS_SWITCHES  # noqa: E402
from pdelta_cp.reference import naive_precond_delta_rule  # noqa: E402
from pdelta_cp.testing import make_inputs, outputs_and_grads, rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_triton_matches_float64(inp: dict) -> None:
    """The Triton op's outputs (final states included) and every input gradient against the float64 reference."""
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    tol = 2e-5 if DEVICE == "cpu" else 5e-3
    assert all(rel_rms(a, b) < tol for a, b in zip(out, ref_out))
    assert all(rel_rms(grads[n], ref_grads[n]) < 10 * tol for n in grads), {
        n: rel_rms(grads[n], ref_grads[n]) for n in grads}


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
def test_whole_chunks_stream_layout_matches_float64(variant):
    """B = 2 sequences of 128 tokens (whole chunks, no padding): q, k normalised straight from the stream layout,
    O written and dO read there by the output kernels (grouped value heads, odd K, V in a full and a masked
    block), K̂'s gradients summed in-kernel — every output and gradient against float64."""
    inp = make_inputs(B=2, T=128, H=2, HV=4, K=12, V=72, variant=variant, dtype=torch.float32, device=DEVICE)
    assert_triton_matches_float64(inp)


@pytest.mark.parametrize("variant", ["pdn", "pgdn", "pkda"])
@pytest.mark.parametrize("cu,K,V", [(None, 16, 16), ([0, 5, 150, 200], 12, 72)],
                         ids=["fixed", "varlen_odd_KV_two_V_blocks"])  # V=72: blocks of 64, the second masked
def test_triton_backend_matches_reference(variant, cu, K, V):
    B = 2 if cu is None else 1
    N = B if cu is None else len(cu) - 1
    inp = make_inputs(B=B, T=200, H=2, HV=4, K=K, V=V, variant=variant, dtype=torch.float32, num_sequences=N,
                      device=DEVICE)
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True,
                                           cu_seqlens=cu_t)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, cu_seqlens=cu_t,
                                   backend="triton")
    tol = 2e-5 if DEVICE == "cpu" else 5e-3
    for name, a, b in zip(("o", "final_S", "final_A"), out, ref_out):
        assert rel_rms(a, b) < tol, (name, rel_rms(a, b))
    for name in grads:
        assert rel_rms(grads[name], ref_grads[name]) < tol, (name, rel_rms(grads[name], ref_grads[name]))


def test_auto_backend_on_cpu_is_torch_and_matches_triton():
    inp = make_inputs(T=100, variant="pgdn", dtype=torch.float32, device=DEVICE)
    args = [inp.get(n) for n in ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")]
    o_t, _, _ = precond_delta_rule(*args, backend="torch")
    o_k, _, _ = precond_delta_rule(*args, backend="triton")
    assert rel_rms(o_k, o_t) < (1e-5 if DEVICE == "cpu" else 5e-3)


def test_wy_backward_kernel_equals_pytorch_recompute(monkeypatch):
    """The two backward paths of the fused WY stage (kernel; PyTorch recompute used on CUDA for now) agree."""
    import pdelta_cp.kernels.wy as wy

    inp = make_inputs(T=150, H=2, HV=4, K=12, V=20, variant="pgdn", dtype=torch.float32, device=DEVICE)
    monkeypatch.setattr(wy, "TRITON_WY_BACKWARD", True)
    _, kernel = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    monkeypatch.setattr(wy, "TRITON_WY_BACKWARD", False)
    _, recompute = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    for name in kernel:
        assert rel_rms(kernel[name], recompute[name]) < (1e-5 if DEVICE == "cpu" else 5e-3), name


@pytest.mark.parametrize("T", [100, 128], ids=["padded", "whole_chunks"])
@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_kernels_that_do_not_fit_fall_back_to_pytorch(monkeypatch, variant, T):
    """A Triton OutOfResources (config too big for the GPU) is caught: same results from the PyTorch form (whole
    chunks: the fallbacks take and give V, dV, O and dO in the stream layout)."""
    import pdelta_cp.kernels._triton_utils as utils
    from triton.runtime.errors import OutOfResources

    utils._warned.clear()
    inp = make_inputs(T=T, H=2, HV=4, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE)
    out_k, grads_k = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")

    def too_big(name, launch):
        return utils.__dict__["_real_launch"](name, lambda: (_ for _ in ()).throw(OutOfResources(1, 0, "shared")))

    monkeypatch.setitem(utils.__dict__, "_real_launch", utils.launch_or_fallback)
    monkeypatch.setattr("pdelta_cp.kernels.stages.launch_or_fallback", too_big)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        out_f, grads_f = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert all(rel_rms(a, b) < tol for a, b in zip(out_f, out_k))
    assert all(rel_rms(grads_f[n], grads_k[n]) < tol for n in grads_k)


@pytest.mark.parametrize("T", [150, 192], ids=["padded", "whole_chunks"])
@pytest.mark.parametrize("where,variant", [("state_pass_forward", "pgdn"), ("state_pass_backward", "pgdn"),
                                           ("wy_backward", "pgdn"), ("wy_backward", "pkda"),
                                           ("wy_and_output_backward", "pgdn")])
def test_output_gradients_left_for_other_stages_survive_their_pytorch_fallbacks(monkeypatch, where, variant, T):
    """The output stage leaves its dW, dU for the state pass's kernel backward and its dP for the WY stage's to add
    (stages.GradHandoff). When such a stage runs in PyTorch instead (its kernels do not fit: the state pass's
    forward or backward, the WY backward), nothing may be lost. GVA (HV = 2H): dP is folded after the sum. With
    the output backward in PyTorch too and HV = H, the WY fallback's dK̂ comes with transposed strides (the write
    keys' kernel adds into it in place). Padded (T = 150): the chunk states in bfloat16, their float32 gradient
    through the handoff's "states" slot into every fallback."""
    import pdelta_cp.kernels._triton_utils as utils
    import pdelta_cp.kernels.stages as stages
    import pdelta_cp.kernels.state_pass as sp
    from triton.runtime.errors import OutOfResources

    utils._warned.clear()
    # (the state pass forward's own fallback makes float32 states: that case compares like with like)
    monkeypatch.setenv("PDELTA_STATES_BF16", "1" if T == 150 and where != "state_pass_forward" else "0")
    # like with like: Δ and the adjoints kept in float32 beside bf16 states (the fallbacks form them exactly)
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0" if T == 150 else "1")
    monkeypatch.setenv("PDELTA_ADJOINTS_BF16", "0")
    HV = 2 if where == "wy_and_output_backward" else 4
    inp = make_inputs(T=T, H=2, HV=HV, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE)
    out_k, grads_k = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")

    def too_big(*args, **kwargs):
        raise OutOfResources(1, 0, "shared")

    if where == "state_pass_forward":
        monkeypatch.setattr(sp.StatePass, "apply", too_big)
    elif where == "state_pass_backward":
        monkeypatch.setattr(sp, "_kernel_backward", too_big)
    else:
        real = stages.launch_or_fallback
        failing = ("wy_bwd", "wy_channel_bwd") + (("output_bwd_qp",) if where == "wy_and_output_backward" else ())
        monkeypatch.setattr(stages, "launch_or_fallback", lambda name, launch: real(
            name, too_big if name in failing else launch))
    with pytest.warns(RuntimeWarning, match="does not fit"):
        out_f, grads_f = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    if where == "state_pass_backward" and T == 150:  # that fallback differentiates a float32 pass (2e-5 apart)
        tol = max(tol, 1e-4)
    assert all(rel_rms(a, b) < tol for a, b in zip(out_f, out_k))
    assert all(rel_rms(grads_f[n], grads_k[n]) < tol for n in grads_k), {n: rel_rms(grads_f[n], grads_k[n])
                                                                          for n in grads_k}


@pytest.mark.parametrize("variant,remake", [("pdn", "wy"), ("pkda", "wy"), ("pdn", "inverse"), ("pkda", "inverse"),
                                            ("pkda", "inverse, rows")])
def test_recomputing_wy_in_backward_changes_nothing(monkeypatch, variant, remake):
    """Backward remakes W, U, P̃ (default: from the stored inverse T, with PKDA's blocked or row forward kernel;
    PDELTA_REMAKE_FROM_INVERSE=0: the whole WY forward again) or keeps them from forward (PDELTA_KEEP_WY=1):
    identical results."""
    if remake == "wy":
        monkeypatch.setenv("PDELTA_REMAKE_FROM_INVERSE", "0")
    if "rows" in remake:
        monkeypatch.setenv("PDELTA_WY_CHANNEL_BLOCKED", "0")
    from pdelta_cp.kernels import stages

    remakers = []
    real_init = stages.Recompute.__init__
    monkeypatch.setattr(stages.Recompute, "__init__",
                        lambda self, fn, *a, **k: remakers.append(getattr(fn, "func", fn).__name__)
                        or real_init(self, fn, *a, **k))
    inp = make_inputs(T=150, H=2, HV=4, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE)
    out_r, grads_r = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert remakers == ["apply" if remake == "wy" else "remake"]
    monkeypatch.setenv("PDELTA_KEEP_WY", "1")
    out_k, grads_k = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(out_r, out_k))
    assert all(torch.equal(grads_r[n], grads_k[n]) for n in grads_k), [n for n in grads_k
                                                                         if not torch.equal(grads_r[n], grads_k[n])]


@pytest.mark.parametrize("variant,states", [("pgdn", "0"), ("pkda", "0"), ("pkda", "1")],
                         ids=["pgdn", "pkda", "pkda_bf16_states"])
def test_recomputing_the_states_in_backward_changes_nothing_but_memory(monkeypatch, variant, states):
    """PDELTA_RECOMPUTE_STATES=1: the chunk states are remade in backward from the sub-segments' entering states
    (T = 330: six chunks in sub-segments of four) — outputs and every gradient bit-identical (also with the states
    stored in bfloat16: the remake rounds them the same way), and (PGDN) the states [Nc, HV, K, V] no longer among
    the saved tensors, only the sub-segments' entering states."""
    monkeypatch.setenv("PDELTA_STATES_BF16", states)
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")  # remade states form Δ again: compare with the path that does
    inp = make_inputs(T=330, H=2, HV=4, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE)
    out_k, grads_k = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    from pdelta_cp.kernels import stages

    monkeypatch.setenv("PDELTA_RECOMPUTE_STATES", "1")
    remade = []
    real = stages._States._remake
    monkeypatch.setattr(stages._States, "_remake", lambda self, *inputs: remade.append(1) or real(self, *inputs))
    out_r, grads_r = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert len(remade) == 1  # once per backward, shared by the output stage and the state pass
    assert all(torch.equal(a, b) for a, b in zip(out_r, out_k))
    assert all(torch.equal(grads_r[n], grads_k[n]) for n in grads_k), [n for n in grads_k
                                                                         if not torch.equal(grads_r[n], grads_k[n])]
    if variant == "pgdn":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
        import graph_stats

        saved_r = graph_stats.graph_stats(variant, 330, 2, 12, 20, torch.float32, "triton", DEVICE)
        monkeypatch.delenv("PDELTA_RECOMPUTE_STATES")
        saved_k = graph_stats.graph_stats(variant, 330, 2, 12, 20, torch.float32, "triton", DEVICE)
        state_bytes = 2 * 12 * 20 * 4  # one state [HV = H = 2, K, V] in float32
        # 6 chunk states kept before; 2 sub-segment entering states now (negligible at real sizes)
        expected = (6 - 2) * state_bytes / 330
        assert saved_k["saved_bytes_per_token"] - saved_r["saved_bytes_per_token"] == pytest.approx(expected)


@pytest.mark.parametrize("flag,value,variant", [("PDELTA_WY_BLOCKED", "0", "pdn"), ("PDELTA_WY_BLOCKED", "0", "pgdn"),
                                                ("PDELTA_STATE_BWD_SPLIT", "0", "pgdn"),
                                                ("PDELTA_STATE_BWD_SPLIT", "0", "pkda"),
                                                ("PDELTA_GRAD_HANDOFF", "0", "pgdn"),
                                                ("PDELTA_GRAD_HANDOFF", "0", "pkda"),
                                                ("PDELTA_WY_CHANNEL_BLOCKED", "0", "pkda"),
                                                ("PDELTA_SCRATCH_TRANSPOSE", "1", "pgdn"),
                                                ("PDELTA_SCRATCH_TRANSPOSE", "1", "pkda"),
                                                ("PDELTA_STREAM_PADDED", "0", "pgdn"),
                                                ("PDELTA_STREAM_PADDED", "0", "pkda"),
                                                ("PDELTA_WY_BWD_SPLIT", "1", "pgdn"),
                                                ("PDELTA_WY_BWD_SPLIT", "0", "pkda"),
                                                ("PDELTA_WY_BWD_DP_IN_DL", "1", "pkda"),
                                                ("PDELTA_OUTPUT_KEY_BLOCKS", "16", "pkda"),
                                                ("PDELTA_WY_KEY_BLOCKS", "16", "pkda")])
def test_switchable_kernel_paths_match_reference(flag, value, variant, monkeypatch):
    """Non-default paths give the same op: PDELTA_WY_BLOCKED=0 (opt-out), the WY forward by 63 row steps;
    PDELTA_STATE_BWD_SPLIT=0 (opt-out), the reverse state pass forms the chunk gradients itself as per-V-block
    partials; PDELTA_GRAD_HANDOFF=0 (opt-out), autograd sums the gradients of W, U, P and K̂;
    PDELTA_WY_CHANNEL_BLOCKED=0 (opt-out), PKDA's WY forward by row steps instead of 16-row blocks;
    PDELTA_SCRATCH_TRANSPOSE=1 (opt-in), the output backward's dA and Aᵀ as transposes through scratch memory;
    PDELTA_STREAM_PADDED=0 (opt-out; T = 150 is padded), relayout copies instead of the kernels' row tables;
    PDELTA_WY_BWD_SPLIT=1 (opt-in for PGDN), the WY backward as a dL kernel and a key-side kernel; =0 (opt-out for
    PKDA) the one-kernel backward; the key-column block opt-ins of PKDA (PDELTA_WY_BWD_DP_IN_DL,
    PDELTA_OUTPUT_KEY_BLOCKS, PDELTA_WY_KEY_BLOCKS).
    Every output and gradient against float64."""
    monkeypatch.setenv(flag, value)
    inp = make_inputs(T=150, H=2, HV=4, K=12, V=72, variant=variant, dtype=torch.float32, device=DEVICE)
    assert_triton_matches_float64(inp)


@pytest.mark.parametrize("decay,doubling", [("scalar", False), ("scalar", True), ("channel", False)])
@pytest.mark.parametrize("keys", ["random", "near-identical"])
def test_blocked_wy_forward_equals_the_row_kernel(decay, doubling, keys):
    """Stage level: W, U, P̃, d and the stored inverse T from both forward kernels agree — the blocked one with
    its diagonal blocks inverted by substitution or by doubling products; for a scalar decay (PDN, PGDN) and a
    per-channel one (PKDA, whose blocked kernel passes L through T's storage). Near-identical keys with gains near 1
    make (I + L)⁻¹ an alternating sum of large terms (the doubling products' hard case)."""
    from pdelta_cp.kernels import channel, wy
    from pdelta_cp.kernels._triton_utils import chunk_tile_config, dot_precision

    gen = torch.Generator().manual_seed(8)
    Nc, H, HV, C, K, V = 3, 2, 4, 64, 20, 40
    k = torch.randn(Nc, H, C, K, generator=gen)
    if keys == "near-identical":
        k = k[:, :, :1] + 0.05 * k
    k = torch.nn.functional.normalize(k, dim=-1)
    p = k * (0.7 + 0.6 * torch.rand(Nc, H, C, K, generator=gen))
    v = torch.randn(Nc, HV, C, V, generator=gen)
    beta = torch.rand(Nc, HV, C, generator=gen) if keys == "random" else 0.9 + 0.1 * torch.rand(Nc, HV, C,
                                                                                                generator=gen)
    per_token = (Nc, HV, C, K) if decay == "channel" else (Nc, HV, C)
    gamma = torch.nn.functional.logsigmoid(torch.randn(*per_token, generator=gen) + 3).cumsum(2)
    BK, BV, warps, stages = chunk_tile_config(K, V)
    outs = []
    if decay == "channel":
        kernels = ((channel._wy_ch_fwd_kernel, {}), (channel._wy_ch_fwd_blocked_kernel, {}))
    else:
        kernels = ((wy._wy_fwd_kernel, {}), (wy._wy_fwd_blocked_kernel, {"DOUBLING": doubling}))
    for kernel, extra in kernels:
        W, P_t = k.new_empty(Nc, HV, C, K), k.new_empty(Nc, HV, C, K)
        U, T = k.new_empty(Nc, HV, C, V), k.new_empty(Nc, HV, C, C)
        d = k.new_empty(Nc, HV, K) if decay == "channel" else k.new_empty(Nc, HV)
        kernel[(Nc, HV)](k, p, v, beta, gamma, W, U, P_t, T, d, H, HV, HV // H, d, d, K=K, V=V, C=C, BK=BK, BV=BV,
                         PRECISION=dot_precision(), num_warps=warps, num_stages=stages, **extra)
        outs.append((W, U, P_t, T, d))
    # the doubling products cancel large terms on near-identical keys: ~1e-4 there (substitution: ~1e-7)
    tol = 3e-4 if doubling and keys == "near-identical" else 1e-5
    for a, b in zip(*outs):
        assert rel_rms(a, b) < tol


@pytest.mark.parametrize("T", [130, 192], ids=["padded", "whole_chunks"])
@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_bf16_values_reach_the_kernels_unconverted(variant, T, monkeypatch):
    """bf16 inputs: the WY kernels read V in bf16 (no float32 copy) and give what the PyTorch path computes from
    the same bf16 values — outputs and every gradient, v's included. Whole chunks (no padding): the q/k
    normalisation reads the stream layout and the output kernels write O (and read dO) there in bf16. (The
    intermediates the kernels store in bf16 by default — Δ, the remade W, U, P̃, the adjoints — are kept in float32
    here, so that only the inputs' path is compared; their rounding has its own tests.)"""
    for switch in ("PDELTA_KEEP_DELTA", "PDELTA_REMAKE_WY_BF16", "PDELTA_ADJOINTS_BF16"):
        monkeypatch.setenv(switch, "0")
    inp = make_inputs(T=T, H=2, HV=4, K=16, V=40, variant=variant, dtype=torch.bfloat16, device=DEVICE)
    twin = {n: t.detach().clone().requires_grad_(True) for n, t in inp.items()}
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    ref_out, ref_grads = outputs_and_grads(precond_delta_rule, twin, output_final_state=True, backend="torch")
    tol = 2e-3 if DEVICE == "cpu" else 2e-2  # same bf16 values, float32 math (TF32 on GPU)
    assert all(rel_rms(a, b) < tol for a, b in zip(out, ref_out))
    assert all(rel_rms(grads[n], ref_grads[n]) < tol for n in grads), {n: rel_rms(grads[n], ref_grads[n])
                                                                      for n in grads}
    assert grads["v"].dtype == torch.bfloat16 and out[0].dtype == torch.bfloat16


@pytest.mark.parametrize("variant,strength", [("pgdn", 1.0), ("pkda", 1.0), ("pkda", 0.02)],
                         ids=["pgdn", "pkda", "pkda_weak_decay"])
def test_chunk_states_stored_in_bf16_keep_every_gradient(variant, strength, monkeypatch):
    """The chunk states S follow the inputs: float32 for float32 inputs, bfloat16 for 16-bit ones
    (state_pass.states_dtype). PDELTA_STATES_BF16=1 forces bfloat16 with float32 inputs here, so that the float64
    comparison sees only the states' rounding: every output and gradient stays within it, the gradient of S reaches
    the pass in float32 through the handoff (autograd would round it to S's dtype), and the saved bytes drop by
    exactly half the states (T = 330: six chunks). Weak gates (states live thousands of tokens): the state term
    dominates O, so S's rounding shows nearly in full there."""
    import pdelta_cp.kernels.state_pass as sp

    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")  # the states' rounding alone: Δ and the adjoints stay float32
    monkeypatch.setenv("PDELTA_ADJOINTS_BF16", "0")

    stored, arrived = [], []
    real_forward, real_arriving = sp.state_forward, sp.arriving_state_grad
    monkeypatch.setattr(sp, "state_forward", lambda *a, **k: stored.append(k.get("starts_dtype")) or
                        real_forward(*a, **k))
    monkeypatch.setattr(sp, "arriving_state_grad", lambda handoff, g: arrived.append(
        (g, real_arriving(handoff, g))) or arrived[-1][1])
    inp = make_inputs(T=330, H=2, HV=4, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE,
                      decay_strength=strength)
    outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert stored[-1] == torch.float32
    half = {n: t.detach().bfloat16().requires_grad_(True) for n, t in inp.items()}
    outputs_and_grads(precond_delta_rule, half, output_final_state=True, backend="triton")
    assert stored[-1] == torch.bfloat16
    stored.clear(), arrived.clear()
    monkeypatch.setenv("PDELTA_STATES_BF16", "1")
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert stored[-1] == torch.bfloat16
    (from_autograd, used), = arrived
    assert from_autograd is None and used.dtype == torch.float32
    errors = {n: rel_rms(a, b) for n, a, b in zip(("o", "final_S", "final_A"), out, ref_out)}
    errors.update({n: rel_rms(grads[n], ref_grads[n]) for n in grads})
    # measured ≈ 4e-4, weak gates ≈ 1.7e-3 (bf16 roundoff 2^-9 on S); float32 states: 2e-5
    tol = (1.5e-3 if strength == 1.0 else 3e-3) if DEVICE == "cpu" else 8e-3
    assert max(errors.values()) < tol, errors
    assert errors["final_S"] < 2e-5  # the pass carries S in float32: only what other kernels read is rounded
    if variant == "pgdn":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
        import graph_stats

        saved_half = graph_stats.graph_stats(variant, 330, 2, 12, 20, torch.float32, "triton", DEVICE)
        monkeypatch.setenv("PDELTA_STATES_BF16", "0")
        saved_full = graph_stats.graph_stats(variant, 330, 2, 12, 20, torch.float32, "triton", DEVICE)
        expected = 6 * 2 * 12 * 20 * 2 / 330  # six states [HV = 2, K, V], 2 bytes each fewer
        assert saved_full["saved_bytes_per_token"] - saved_half["saved_bytes_per_token"] == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_adjoints_in_bf16_keep_every_gradient(variant, monkeypatch):
    """PDELTA_ADJOINTS_BF16=1 (with bfloat16 states): dS leaves the output stage in bfloat16 and the reverse pass
    stores its adjoints Λ so (over dS) — the forward is untouched, every gradient stays within bf16 roundoff of
    float64 (weak gates: the adjoints live long), the gradients do move off the float32-adjoint ones, and the
    state pass's PyTorch fallback takes the bfloat16 dS too."""
    import pdelta_cp.kernels.state_pass as sp
    from triton.runtime.errors import OutOfResources

    arrived = []
    real_arriving = sp.arriving_state_grad
    monkeypatch.setattr(sp, "arriving_state_grad", lambda handoff, g: arrived.append(real_arriving(handoff, g))
                        or arrived[-1])
    monkeypatch.setenv("PDELTA_STATES_BF16", "1")
    monkeypatch.setenv("PDELTA_KEEP_DELTA", "0")  # the adjoints' rounding alone (Δ would be bf16 beside them)
    inp = make_inputs(T=330, H=2, HV=4, K=12, V=20, variant=variant, dtype=torch.float32, device=DEVICE,
                      decay_strength=0.02)
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(naive_precond_delta_rule, ref_inp, output_final_state=True)
    monkeypatch.setenv("PDELTA_ADJOINTS_BF16", "0")
    out32, grads32 = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert arrived.pop().dtype == torch.float32
    monkeypatch.setenv("PDELTA_ADJOINTS_BF16", "1")
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert arrived.pop().dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(out, out32))
    errors = {n: rel_rms(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) < (3e-3 if DEVICE == "cpu" else 8e-3), errors
    assert rel_rms(grads["k"], grads32["k"]) > 1e-5 and rel_rms(grads["v"], grads32["v"]) > 1e-5

    def too_big(*args, **kwargs):
        raise OutOfResources(1, 0, "shared")

    import pdelta_cp.kernels._triton_utils as utils

    utils._warned.clear()  # (each fallback warns once per process)
    monkeypatch.setattr(sp, "_kernel_backward", too_big)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        _, grads_f = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert all(rel_rms(grads_f[n], grads[n]) < 3e-3 for n in grads), {n: rel_rms(grads_f[n], grads[n])
                                                                       for n in grads}


def test_sub_len_switch(monkeypatch):
    """PDELTA_SUB_LEN: 0 runs every segment as one sequential pass (no summaries), N cuts N-chunk sub-segments;
    both match float64. A value that is not a whole number is refused by name."""
    import pdelta_cp.kernels.state_pass as sp

    summaries = []
    real_forward = sp.state_forward
    monkeypatch.setattr(sp, "state_forward", lambda *a, **k: summaries.append(k.get("summary", False)) or
                        real_forward(*a, **k))
    for value, summarised in (("0", False), ("2", True)):
        monkeypatch.setenv("PDELTA_SUB_LEN", value)
        summaries.clear()
        inp = make_inputs(T=400, H=1, HV=2, K=16, V=16, variant="pgdn", dtype=torch.float32, device=DEVICE)
        assert_triton_matches_float64(inp)
        assert any(summaries) == summarised, (value, summaries)
    assert sp.default_sub_len([7, 3], 2, 16, torch.device(DEVICE)) == 2
    monkeypatch.setenv("PDELTA_SUB_LEN", "0")
    assert sp.default_sub_len([7, 3], 2, 16, torch.device(DEVICE)) == 7
    monkeypatch.setenv("PDELTA_STATE_BV", "16")  # the pass's V tile: a tuning switch, checked the same way
    inp = make_inputs(T=200, H=1, HV=1, K=16, V=40, variant="pgdn", dtype=torch.float32, device=DEVICE)
    assert_triton_matches_float64(inp)
    assert sp._config(16, 40)[1] == 16
    monkeypatch.setenv("PDELTA_STATE_BV", "24")
    with pytest.raises(ValueError, match="PDELTA_STATE_BV must be one of 16, 32, 64"):
        sp._config(16, 40)
    monkeypatch.delenv("PDELTA_STATE_BV")
    monkeypatch.setenv("PDELTA_SUB_LEN", "auto")
    with pytest.raises(ValueError, match="PDELTA_SUB_LEN='auto'"):
        sp.default_sub_len([7, 3], 2, 16, torch.device(DEVICE))
    monkeypatch.delenv("PDELTA_SUB_LEN")


def test_sub_segment_policy_and_pass_stages(monkeypatch):
    """The GPU policy (the interpreter always cuts): one pass per segment when that gives programs for a quarter
    of the SMs (B = 1, H = 16, V = 128 on 132 SMs: 64 programs), sub-segments for ~4 waves below (H = 4) and
    always where summaries are needed anyway (CP); 2 pipeline stages for the sequential passes up to K = 128."""
    import pdelta_cp.kernels.state_pass as sp

    monkeypatch.delenv("PDELTA_SUB_LEN", raising=False)
    monkeypatch.setattr(sp, "INTERPRET", False)
    monkeypatch.setattr(sp, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert sp.default_sub_len([512], 16, 128, dev) == 512
    assert sp.default_sub_len([64] * 8, 4, 128, dev) == 64  # 8 sequences: 128 programs
    assert sp.default_sub_len([512], 4, 128, dev) == 16  # 16 programs: 33 sub-segments
    assert sp.default_sub_len([512], 16, 128, dev, summaries_needed=True) == 64
    assert sp._config(128, 128, pass_stages=True)[3] == 2 and sp._config(128, 256)[3] == 1
    assert sp._config(256, 256, pass_stages=True)[3] == 1 and sp._config(64, 64)[3] == 2


def test_wy_forward_choice(monkeypatch):
    """Blocked forward at 4 warps for K <= 128; the row kernel above (not GPU-tried blocked) or when opted out.
    PKDA: the same choice (blocked up to K = 128, the row kernel at 4 warps when opted out)."""
    from pdelta_cp.kernels import wy

    monkeypatch.delenv("PDELTA_WY_BLOCKED", raising=False)
    assert wy._pick_wy_forward(128) == (wy._wy_fwd_blocked_kernel, 4)
    assert wy._pick_wy_forward(136) == (wy._wy_fwd_kernel, None)
    monkeypatch.setenv("PDELTA_WY_BLOCKED", "0")
    assert wy._pick_wy_forward(64) == (wy._wy_fwd_kernel, None)
    from pdelta_cp.kernels import channel

    monkeypatch.delenv("PDELTA_WY_CHANNEL_BLOCKED", raising=False)
    monkeypatch.delenv("PDELTA_WY_KEY_BLOCKS", raising=False)
    assert channel._pick_wy_channel_forward(128) == (channel._wy_ch_fwd_blocked_kernel, 4, {})
    monkeypatch.setenv("PDELTA_WY_KEY_BLOCKS", "32")  # opt-in: the blocked kernel over key-column blocks
    assert channel._pick_wy_channel_forward(128) == (channel._wy_ch_fwd_blocked_kernel, 4, {"KB": 32})
    assert channel._pick_wy_channel_forward(20) == (channel._wy_ch_fwd_blocked_kernel, 4, {"KB": 32})
    assert channel._pick_wy_channel_forward(12) == (channel._wy_ch_fwd_blocked_kernel, 4, {"KB": 16})
    assert channel._pick_wy_channel_forward(256) == (channel._wy_ch_fwd_kernel, None)
    monkeypatch.setenv("PDELTA_WY_CHANNEL_BLOCKED", "0")
    assert channel._pick_wy_channel_forward(128) == (channel._wy_ch_fwd_kernel, 4)


def test_keys_above_128_take_the_row_forward_and_match_reference():
    """K = 136 (tiles of 256): the op through the row WY forward, every output and gradient against float64."""
    inp = make_inputs(T=70, H=1, HV=1, K=136, V=24, variant="pgdn", dtype=torch.float32, device=DEVICE)
    assert_triton_matches_float64(inp)


def test_launch_config_switches(monkeypatch):
    from pdelta_cp.kernels._triton_utils import launch_config

    for var in ("PDELTA_WARPS_STATE_FWD", "PDELTA_STAGES_STATE_FWD"):
        monkeypatch.delenv(var, raising=False)
    assert launch_config("state_fwd", 8, 1) == {"num_warps": 8, "num_stages": 1}
    monkeypatch.setenv("PDELTA_WARPS_STATE_FWD", "4")
    monkeypatch.setenv("PDELTA_STAGES_STATE_FWD", "2")
    assert launch_config("state_fwd", 8, 1) == {"num_warps": 4, "num_stages": 2}
    monkeypatch.setenv("PDELTA_WARPS_STATE_FWD", "3")
    with pytest.raises(ValueError, match="PDELTA_WARPS_STATE_FWD must be one of 1, 2, 4, 8, 16, got '3'"):
        launch_config("state_fwd", 8, 1)


@pytest.mark.parametrize("kind", ["WARPS", "STAGES"])
@pytest.mark.parametrize("variant,kernel", [(v, k) for v, names in WARPS_SWITCHES.items() for k in names])
def test_every_kernel_family_reads_its_switches(variant, kernel, kind, monkeypatch):
    """The names benchmarks/warps_sweep.py sweeps are the ones the launches read (a bad value must surface)."""
    monkeypatch.setenv(f"PDELTA_{kind}_{kernel.upper()}", "3" if kind == "WARPS" else "9")
    inp = make_inputs(T=70, H=1, HV=1, K=16, V=16, variant=variant, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=f"PDELTA_{kind}_{kernel.upper()}"):
        outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")



@pytest.mark.parametrize("path", ["kernel", "unsplit_backward", "state_grads_fallback", "state_pass_fallback"])
@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_fused_dw_matches_the_output_stages_own(variant, path, monkeypatch):
    """PDELTA_FUSE_DW=1: the output stage leaves dU without dW and the state pass forms dW = −(dU_out + P̃Λ) Sᵀ —
    the same gradients as the output stage's own dW added in (float32 roundoff), on the chunk-gradient kernel, the
    per-V-block reverse pass (PDELTA_STATE_BWD_SPLIT=0), that kernel's PyTorch fallback and the whole state pass's
    PyTorch backward; and the output stage really left no dW."""
    import pdelta_cp.kernels._triton_utils as utils
    import pdelta_cp.kernels.stages as stages
    import pdelta_cp.kernels.state_pass as sp
    from triton.runtime.errors import OutOfResources

    inp = make_inputs(T=200, H=2, HV=4, K=16, V=24, variant=variant, dtype=torch.float32, device=DEVICE)
    monkeypatch.setenv("PDELTA_FUSE_DW", "0")
    out_own, grads_own = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    monkeypatch.setenv("PDELTA_FUSE_DW", "1")
    left = []
    real_leave = stages.GradHandoff.leave
    monkeypatch.setattr(stages.GradHandoff, "leave", lambda self, slot, *g: (slot == "state_pass" and left.append(g))
                        or real_leave(self, slot, *g))

    def too_big(*args, **kwargs):
        raise OutOfResources(1, 0, "shared")

    utils._warned.clear()
    if path == "unsplit_backward":
        monkeypatch.setenv("PDELTA_STATE_BWD_SPLIT", "0")
    elif path == "state_grads_fallback":
        real = sp.launch_or_fallback
        monkeypatch.setattr(sp, "launch_or_fallback", lambda name, launch: real(
            name, too_big if name == "state_grads" else launch))
    elif path == "state_pass_fallback":
        monkeypatch.setattr(sp, "_kernel_backward", too_big)
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, backend="triton")
    assert left and all(g[0] is None and g[1] is not None for g in left)
    assert all(torch.equal(a, b) for a, b in zip(out, out_own))
    tol = 1e-6 if DEVICE == "cpu" else 1e-3
    assert all(rel_rms(grads[n], grads_own[n]) < tol for n in grads), {n: rel_rms(grads[n], grads_own[n])
                                                                      for n in grads}


@pytest.mark.parametrize("variant,cu,dp_in_dl,K,key_blocks", [
    ("pgdn", None, "0", 16, "0"), ("pkda", None, "0", 16, "0"), ("pkda", None, "1", 16, "0"),
    ("pdn", (0, 70, 200), "0", 16, "0"), ("pkda", (0, 90, 200), "0", 16, "0"), ("pkda", (0, 90, 200), "1", 40, "0"),
    ("pgdn", (0, 70, 200), "0", 40, "32"), ("pdn", None, "0", 40, "16")])
def test_split_wy_backward_matches_the_one_kernel_backward(variant, cu, dp_in_dl, K, key_blocks, monkeypatch):
    """PDELTA_WY_BWD_SPLIT=1 (PKDA's default): the WY backward as the dL kernel plus the key-side kernel reading dL
    and dLᵀ from scratch gives the one-kernel backward's gradients (float32 roundoff; padded chunks, varlen, grouped
    values); both kernels really ran; when the key-side kernel does not fit, the PyTorch form takes over (also after
    a dL kernel that added its dP into the output stage's: PDELTA_WY_BWD_DP_IN_DL=1); when the dL kernel does not
    fit, the one-kernel backward. PDN/PGDN with PDELTA_WY_KEY_BLOCKS: the key side by column blocks (K = 40: two or
    three blocks, the last masked)."""
    monkeypatch.setenv("PDELTA_WY_BWD_DP_IN_DL", dp_in_dl)
    monkeypatch.setenv("PDELTA_WY_KEY_BLOCKS", key_blocks)  # PDN/PGDN: the split key side by column blocks
    import pdelta_cp.kernels._triton_utils as utils
    import pdelta_cp.kernels.stages as stages
    from triton.runtime.errors import OutOfResources

    inp = make_inputs(T=200, H=2, HV=4, K=K, V=24, variant=variant, dtype=torch.float32, device=DEVICE,
                      num_sequences=1 if cu is None else len(cu) - 1)  # K = 40: two key-column blocks of 32, one masked
    kw = dict(output_final_state=True, backend="triton",
              cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE))
    monkeypatch.setenv("PDELTA_WY_BWD_SPLIT", "0")
    out_one, grads_one = outputs_and_grads(precond_delta_rule, inp, **kw)
    monkeypatch.setenv("PDELTA_WY_BWD_SPLIT", "1")
    launched = []
    real = stages.launch_or_fallback
    monkeypatch.setattr(stages, "launch_or_fallback", lambda name, launch: launched.append(name) or real(name, launch))
    out, grads = outputs_and_grads(precond_delta_rule, inp, **kw)
    stage = "wy_channel" if variant == "pkda" else "wy"
    assert f"{stage}_bwd_dl" in launched and launched.index(f"{stage}_bwd_dl") < launched.index(f"{stage}_bwd")
    assert all(torch.equal(a, b) for a, b in zip(out, out_one))
    tol = 1e-5 if DEVICE == "cpu" else 2e-3
    for name in grads_one:
        assert rel_rms(grads[name], grads_one[name]) < tol, name

    def grads_when_too_big(which):
        """The gradients when the launch named ``which`` raises OutOfResources (the launches in ``launched``)."""
        launched.clear()

        def launch_or_fail(name, launch):
            launched.append(name)
            if name == which:
                launch = lambda: (_ for _ in ()).throw(OutOfResources(1, 0, "shared"))  # noqa: E731
            return real(name, launch)

        utils._warned.clear()
        monkeypatch.setattr(stages, "launch_or_fallback", launch_or_fail)
        with pytest.warns(RuntimeWarning, match="does not fit"):
            return outputs_and_grads(precond_delta_rule, inp, **kw)[1]

    grads_fb = grads_when_too_big(f"{stage}_bwd")  # the key side does not fit: the PyTorch form
    for name in grads_one:
        assert rel_rms(grads_fb[name], grads_one[name]) < (1e-5 if DEVICE == "cpu" else 5e-3), name

    # a dL kernel that does not fit: the one-kernel Triton backward runs instead (not PyTorch)
    grads_one_again = grads_when_too_big(f"{stage}_bwd_dl")
    assert launched.index(f"{stage}_bwd") > launched.index(f"{stage}_bwd_dl")
    for name in grads_one:
        assert rel_rms(grads_one_again[name], grads_one[name]) < (1e-5 if DEVICE == "cpu" else 5e-3), name


def test_split_wy_backward_default_and_switch(monkeypatch):
    """Split by default for a per-channel decay only; PDELTA_WY_BWD_SPLIT=0/1 forces it; other values are refused."""
    from pdelta_cp.kernels.stages import split_wy_backward

    monkeypatch.delenv("PDELTA_WY_BWD_SPLIT", raising=False)
    assert split_wy_backward(True) and not split_wy_backward(False)
    monkeypatch.setenv("PDELTA_WY_BWD_SPLIT", "1")
    assert split_wy_backward(True) and split_wy_backward(False)
    monkeypatch.setenv("PDELTA_WY_BWD_SPLIT", "0")
    assert not split_wy_backward(True) and not split_wy_backward(False)
    monkeypatch.setenv("PDELTA_WY_BWD_SPLIT", "yes")
    with pytest.raises(ValueError, match="PDELTA_WY_BWD_SPLIT must be 0 or 1"):
        split_wy_backward(True)


@pytest.mark.parametrize("blocks,K,keep_delta,fuse_dw,cu", [("16", 40, "1", "1", None),
                                                            ("32", 40, "0", "1", (0, 90, 200)),
                                                            ("16", 40, "1", "0", None),
                                                            ("64", 16, "1", "1", (0, 90, 200))])
def test_output_key_blocks_match_the_whole_key_kernels(blocks, K, keep_delta, fuse_dw, cu, monkeypatch):
    """PDELTA_OUTPUT_KEY_BLOCKS and PDELTA_WY_KEY_BLOCKS (opt-ins): PKDA's output kernels and blocked WY forward in
    key-column blocks (the forwards and the dS backward summing the Gram and the key-dimension products over blocks,
    the dQ̂/dP backward's key side block by block, W, P̃, d written by blocks) give the whole-key kernels' outputs
    and gradients (float32 roundoff): several blocks with a masked last one (K = 40), one block wider than K, Δ kept
    or formed, the dS backward with and without dW (PDELTA_FUSE_DW=0: it keeps the whole-key path), varlen; bad
    values are refused."""
    monkeypatch.setenv("PDELTA_FUSE_DW", fuse_dw)
    inp = make_inputs(T=200, H=2, HV=4, K=K, V=24, variant="pkda", dtype=torch.float32, device=DEVICE,
                      num_sequences=1 if cu is None else len(cu) - 1)
    kw = dict(output_final_state=True, backend="triton",
              cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE))
    monkeypatch.setenv("PDELTA_KEEP_DELTA", keep_delta)
    for var in ("PDELTA_OUTPUT_KEY_BLOCKS", "PDELTA_WY_KEY_BLOCKS"):
        monkeypatch.setenv(var, "0")
    out_whole, grads_whole = outputs_and_grads(precond_delta_rule, inp, **kw)
    for var in ("PDELTA_OUTPUT_KEY_BLOCKS", "PDELTA_WY_KEY_BLOCKS"):
        monkeypatch.setenv(var, blocks)
    out, grads = outputs_and_grads(precond_delta_rule, inp, **kw)
    for a, b in zip(out, out_whole):
        assert rel_rms(a, b) < (1e-6 if DEVICE == "cpu" else 1e-3)
    for name in grads_whole:
        assert rel_rms(grads[name], grads_whole[name]) < (1e-5 if DEVICE == "cpu" else 2e-3), name
    monkeypatch.setenv("PDELTA_OUTPUT_KEY_BLOCKS", "8")
    with pytest.raises(ValueError, match="PDELTA_OUTPUT_KEY_BLOCKS must be 0, 16, 32 or 64"):
        outputs_and_grads(precond_delta_rule, inp, **kw)
