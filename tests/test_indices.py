"""Host-list indexing through cached device index tensors (no host-to-device copy, hence no GPU sync, per call)."""
import torch

from pdelta_cp.indices import index_tensor, put_rows, take_rows


def test_index_tensor_is_cached_per_values_and_device():
    a = index_tensor([3, 1, 2], "cpu")
    assert a is index_tensor((3, 1, 2), torch.device("cpu"))
    assert a.tolist() == [3, 1, 2] and a.dtype == torch.long
    assert index_tensor([3, 1, 2], "cpu", torch.int32) is not a


def test_take_and_put_rows_match_list_indexing():
    t = torch.randn(6, 2, 3)
    assert torch.equal(take_rows(t, [4, 0, 5]), t[[4, 0, 5]])
    assert take_rows(t, range(6)) is t  # all rows in order: no copy
    u, v = torch.zeros(6, 2, 3), torch.zeros(6, 2, 3)
    src = torch.randn(2, 2, 3)
    put_rows(u, [5, 1], src)
    v[[5, 1]] = src
    assert torch.equal(u, v)
