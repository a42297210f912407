"""The chunkwise (WY/UT) algorithm in PyTorch: the blueprint of the kernels and the ``backend="torch"`` path."""
