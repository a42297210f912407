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
