"""GPU tests at realistic sizes: backend="triton" against the float64 PyTorch chunk path (itself checked
against the per-token reference on CPU). Run on a CUDA machine: ``pytest -m gpu tests/test_gpu.py``.

Limits (relative RMS error) follow the reference implementation's own tests, bf16 inputs:
outputs and final states 5e-3; dq/dk/dv/initial-state grads 8e-3; gate, gain and centre grads 2e-2.
"""
import pytest
import torch

from pdelta_cp import precond_delta_rule
from pdelta_cp.testing import make_inputs, outputs_and_grads, rel_rms

pytestmark = pytest.mark.gpu

LIMITS = {"o": 5e-3, "final_S": 5e-3, "final_A": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "initial_state": 8e-3,
          "initial_A_state": 8e-3}
OTHER = 2e-2  # beta, g, g_atk, beta_atk, log_atk_scale

CASES = {  # name: (variant, B, T, H, HV, K, V, dtype, cu_seqlens)
    "pgdn_16k_h16_bf16": ("pgdn", 1, 16384, 16, 16, 128, 128, torch.bfloat16, None),
    "pdn_8k_bf16": ("pdn", 1, 8192, 8, 8, 128, 128, torch.bfloat16, None),
    "pkda_4k_h8_bf16": ("pkda", 1, 4096, 8, 8, 128, 128, torch.bfloat16, None),
    "pgdn_varlen_odd_fp32": ("pgdn", 1, 3000, 4, 8, 100, 120, torch.float32, [0, 15, 1200, 1201, 3000]),
    "pkda_varlen_odd_bf16": ("pkda", 1, 2500, 4, 4, 120, 100, torch.bfloat16, [0, 256, 500, 1000, 2500]),
    "pgdn_batch_fp16": ("pgdn", 4, 2048, 4, 4, 64, 64, torch.float16, None),
    "pgdn_k256_bf16": ("pgdn", 1, 2048, 2, 2, 256, 256, torch.bfloat16, None),
    "pkda_k256_gva_bf16": ("pkda", 1, 1024, 2, 4, 256, 192, torch.bfloat16, [0, 300, 1024]),
    # weak gates (a state lives thousands of tokens): with the reference tests' gates (decay_strength 1) a chunk's
    # entering state is nearly forgotten by its end, so PGDN's and PKDA's chunk-to-chunk coupling (the W·S feedback
    # of the state pass) moves the outputs by ~1e-7 and a broken one would pass (benchmarks/precision_sites.py)
    "pgdn_4k_weak_decay_bf16": ("pgdn", 1, 4096, 8, 8, 128, 128, torch.bfloat16, None),
    "pkda_2k_weak_decay_bf16": ("pkda", 1, 2048, 4, 4, 128, 128, torch.bfloat16, None),
}
WEAK_DECAY = 0.02  # decay_strength of the *_weak_decay cases (as tests/distributed/test_cp_gpu.py)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    variant, B, T, H, HV, K, V, dtype, cu = CASES[name]
    N = B if cu is None else len(cu) - 1
    inp = make_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, variant=variant, dtype=dtype, num_sequences=N,
                      device="cuda", decay_strength=WEAK_DECAY if "weak_decay" in name else 1.0)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda")
    ref_inp = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    ref_out, ref_grads = outputs_and_grads(precond_delta_rule, ref_inp, output_final_state=True, cu_seqlens=cu_t,
                                           backend="torch")
    out, grads = outputs_and_grads(precond_delta_rule, inp, output_final_state=True, cu_seqlens=cu_t,
                                   backend="triton")
    errors = {n: rel_rms(a, b) for n, a, b in zip(("o", "final_S", "final_A"), out, ref_out)}
    errors.update({n: rel_rms(grads[n], ref_grads[n]) for n in grads})
    print(name, {n: f"{e:.2e}" for n, e in errors.items()})
    bad = {n: e for n, e in errors.items() if not e < LIMITS.get(n, OTHER)}
    assert not bad, bad
