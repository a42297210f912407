"""Run megatron-core on CPU (tests, CI): the two adjustments it needs, applied explicitly.

``enable_cpu()`` makes ``torch.cuda.current_device`` return the CPU device (Megatron's memory buffers and
weight allocation ask for it), makes ``torch.cuda.synchronize`` a no-op (distributed checkpointing calls it),
and installs Megatron's no-op RNG tracker (it otherwise seeds CUDA).
Idempotent. Never applied at import.
"""
from __future__ import annotations

import torch

_applied = False


def enable_cpu(seed: int = 1234) -> None:
    global _applied
    if torch.cuda.is_available():
        return
    from megatron.core import tensor_parallel

    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _applied = True
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
