"""Small index tensors made from host lists, cached per device.

Copying a host list to the GPU costs a stream synchronisation (pageable host memory): the host waits for all
queued GPU work, and the GPU then idles while the host queues the next kernels. The op builds the same few index
tensors at every call (every layer, every step), so each is made once per device and reused (read-only).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1024)
def _cached(values: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def index_tensor(values, device, dtype: torch.dtype = torch.long) -> Tensor:
    """``torch.tensor(values, dtype, device)``, cached: never modify the result in place."""
    return _cached(tuple(int(v) for v in values), torch.device(device), dtype)


def take_rows(t: Tensor, rows) -> Tensor:
    """``t[rows]`` for a host list of row numbers through a cached index (a list index is copied to the GPU, and
    synchronises, at every call). All rows in order: ``t`` itself."""
    rows = tuple(int(r) for r in rows)
    if rows == tuple(range(t.shape[0])):
        return t
    return t.index_select(0, index_tensor(rows, t.device))


def put_rows(t: Tensor, rows, src: Tensor) -> Tensor:
    """``t[rows] = src`` (in place) for a host list of distinct row numbers, through a cached index."""
    return t.index_copy_(0, index_tensor(rows, t.device), src)
