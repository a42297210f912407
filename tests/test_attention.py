"""The hybrid models' softmax attention: packed sequences never see each other and restart their positions."""
import torch

from pdelta_cp.attention import CausalSelfAttention
from pdelta_cp.testing import rel_rms


def test_packed_sequences_equal_separate_runs():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    cu = [0, 7, 19, 30]
    packed = attn(x, cu_seqlens=torch.tensor(cu))
    for a, b in zip(cu, cu[1:]):
        alone = attn(x[:, a:b])
        assert rel_rms(packed[:, a:b], alone) < 1e-12


def test_causality():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 8:] += 1.0  # change the future
    assert torch.equal(attn(x2)[:, :8], y[:, :8])
