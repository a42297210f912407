"""The DeepSpeed optimizer path: ZeRO stage 0/1/2 over all ranks (DP x CP), CP inside the model.

With tensor parallelism 1 every rank holds a full replica, so DeepSpeed's data-parallel group is the whole
world; it averages gradients over it, so each rank backpropagates world x (its token-loss sum / global token
count) and the average is exactly the global-mean gradient, CP contributions included.
"""
from __future__ import annotations

import importlib
import os

import torch


def _skip_cpu_shm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory op at init (~45 s); gloo does not need it."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def initialize(model, optimizer, scheduler, cfg):
    """Wrap (model, optimizer, scheduler) in a DeepSpeed engine; returns the engine."""
    _skip_cpu_shm_build()
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine
