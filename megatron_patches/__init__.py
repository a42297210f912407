"""Megatron-core integration (installed as ``pdelta_cp.megatron_patches``). Not written yet."""
