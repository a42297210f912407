import os

import pytest
import torch

# under torchrun every rank gets one thread: oversubscribed OpenMP threads spin and slow 2-core machines 10x
_LAUNCHED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
torch.set_num_threads(1 if _LAUNCHED else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA; skip distributed tests outside a torchrun launch."""
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "distributed" in str(item.fspath) and not _LAUNCHED:
            item.add_marker(pytest.mark.skip(reason="run under torchrun (see run.sh test)"))
