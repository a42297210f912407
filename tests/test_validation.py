"""Bad input raises a clear ValueError/TypeError that names the argument (single process)."""
import pytest
import torch

from pdelta_cp import precond_delta_rule
from pdelta_cp.testing import SEQUENCE_ARGS, make_inputs


def _args(**changes):
    inp = {n: t.detach() for n, t in make_inputs(B=1, T=16, H=2, HV=4, K=8, V=8, variant="pgdn").items()}
    inp.update(changes)
    pos = [inp[n] for n in SEQUENCE_ARGS]
    kw = {n: inp[n] for n in ("initial_state", "initial_A_state", "log_atk_scale")}
    return pos, kw


def _raises(exc, match, pos_changes=None, **kw_changes):
    pos, kw = _args(**(pos_changes or {}))
    kw.update(kw_changes)
    with pytest.raises(exc, match=match):
        precond_delta_rule(*pos, **kw)


def test_shape_mismatches_name_the_argument():
    _raises(ValueError, "k must have shape", {"k": torch.randn(1, 16, 2, 7, dtype=torch.float64)})
    _raises(ValueError, "v must have shape", {"v": torch.randn(1, 15, 4, 8, dtype=torch.float64)})
    _raises(ValueError, "beta must have shape", {"beta": torch.rand(1, 16, 2, dtype=torch.float64)})
    _raises(ValueError, "g_atk must have shape", {"g_atk": torch.rand(1, 16, 4, dtype=torch.float64)})
    _raises(ValueError, "g must be None", {"g": torch.rand(1, 16, dtype=torch.float64)})
    _raises(ValueError, "g must have shape", {"g": torch.rand(1, 16, 4, 7, dtype=torch.float64)})
    _raises(ValueError, "initial_state must have shape", initial_state=torch.zeros(1, 4, 8, 7, dtype=torch.float64))
    _raises(ValueError, "initial_A_state must have shape", initial_A_state=torch.zeros(2, 2, 8, dtype=torch.float64))
    _raises(ValueError, "log_atk_scale must be", log_atk_scale=torch.zeros(3, dtype=torch.float64))


def test_dtype_problems():
    _raises(TypeError, "q, k and v must share a dtype", {"v": torch.randn(1, 16, 4, 8)})
    _raises(TypeError, "beta must be a floating tensor", {"beta": torch.ones(1, 16, 4, dtype=torch.long)})
    _raises(TypeError, "g_atk must be a torch.Tensor", {"g_atk": [0.0]})


def test_grouped_heads_must_divide():
    _raises(ValueError, "multiple of the key heads", {"v": torch.randn(1, 16, 3, 8, dtype=torch.float64),
                                                      "beta": torch.rand(1, 16, 3, dtype=torch.float64),
                                                      "g": torch.rand(1, 16, 3, dtype=torch.float64)},
            initial_state=None)


def test_cu_seqlens_problems():
    _raises(ValueError, "start at 0", cu_seqlens=torch.tensor([1, 16]), initial_state=None, initial_A_state=None)
    _raises(ValueError, "strictly increasing", cu_seqlens=torch.tensor([0, 9, 9, 16]), initial_state=None,
            initial_A_state=None)
    _raises(ValueError, "must equal the total number of tokens", cu_seqlens=torch.tensor([0, 15]),
            initial_state=None, initial_A_state=None)
    _raises(ValueError, "1-D integer tensor", cu_seqlens=torch.tensor([0.0, 16.0]))
    pos, kw = _args()
    pos = [torch.cat([t, t]) for t in pos]
    with pytest.raises(ValueError, match="B must be 1"):
        precond_delta_rule(*pos, cu_seqlens=torch.tensor([0, 16]))


def test_options():
    _raises(ValueError, "x .* must be a number >= 1", x=0.9)
    _raises(ValueError, "eps must be a number > 0", eps=0.0)
    _raises(ValueError, "cp_layout must be one of", cp_layout="ring")
    _raises(ValueError, "backend must be one of", backend="cuda")
    _raises(ValueError, "scale must be None", scale=-1.0)
    _raises(ValueError, "backend=.triton.", backend="triton")  # float64 (and, without CUDA or interpreter, CPU)


def test_x_equal_one_is_valid():
    pos, kw = _args()
    o, _, _ = precond_delta_rule(*pos, **kw, x=1.0)
    assert torch.isfinite(o).all()


def test_zigzag_without_group_needs_even_length():
    pos, kw = _args()
    pos = [t[:, :15] for t in pos]
    with pytest.raises(ValueError, match="multiple of 2"):
        precond_delta_rule(*pos, **kw, cp_layout="zigzag")
