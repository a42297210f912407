import os

import pytest
import torch

# Triton kernels run on CPU only in the interpreter; it must be chosen before any kernel module is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from pdelta_cp.kernels._triton_utils import patch_interpreter_bf16

        patch_interpreter_bf16()
    except ImportError:  # triton not installed: the kernel tests skip themselves
        pass

# under torchrun every rank gets one thread: oversubscribed OpenMP threads spin and slow 2-core machines 10x
_LAUNCHED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
torch.set_num_threads(1 if _LAUNCHED else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA; skip distributed tests outside a torchrun launch."""
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available() and not os.environ.get("PDELTA_GPU_TEST_ON_CPU"):
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "distributed" in str(item.fspath) and not _LAUNCHED:
            item.add_marker(pytest.mark.skip(reason="run under torchrun (see run.sh test)"))
