"""Megatron-core integration (installed as ``pdelta_cp.megatron_patches``; needs megatron-core).

* :class:`~.mixer.MegatronPrecondDeltaMixer` — the token mixer (TP over heads, CP over tokens).
* :func:`~.specs.pdelta_layer_spec`, :func:`~.specs.pdelta_block_spec` — ``ModuleSpec``s for pure and hybrid stacks.
* :func:`~.cpu.enable_cpu` — the explicit, idempotent shim for running Megatron on CPU (tests).
Nothing is patched at import.
"""
