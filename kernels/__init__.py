"""Triton kernels (installed as ``pdelta_cp.kernels``).

Not written yet: ``precond_delta_rule(..., backend="triton")`` raises a clear NotImplementedError until
they land (issue: Triton chunkwise kernels). The PyTorch chunk path in ``pdelta_cp.chunk`` is their blueprint.
"""
