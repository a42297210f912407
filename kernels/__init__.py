"""Triton kernels (installed as ``pdelta_cp.kernels``), each mirroring a stage of :mod:`pdelta_cp.chunk`.

Import this package only where Triton can run (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""
