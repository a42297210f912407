"""The training job: configs, the embedded default dataset, and the loop (CP x DP over torch.distributed)."""
