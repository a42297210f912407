"""Megatron-core layer specs: pure PDN/PGDN/PKDA stacks and hybrids with softmax attention every k-th layer.

Built only from Megatron's local (non-Transformer-Engine) modules plus :class:`MegatronPrecondDeltaMixer`, so
they run wherever megatron-core imports (apex and TE optional). Tested with megatron-core 0.16.1.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .mixer import MegatronPrecondDeltaMixer


def pdelta_layer_spec(variant: str = "pgdn", *, num_heads: int | None = None, head_dim: int | None = None,
                      num_v_heads: int | None = None, squash_x: float = 1.5, cp_layout: str = "zigzag",
                      backend: str = "auto") -> ModuleSpec:
    """A ``TransformerLayer`` whose ``self_attention`` is the preconditioned delta-rule mixer (pre-norm RMSNorm,
    bias-dropout-add, Megatron's MLP). Mixer arguments default to the config's heads and kv_channels."""
    local = LocalSpecProvider()
    norm = local.layer_norm(rms_norm=True, for_qk=False)
    mixer = ModuleSpec(module=MegatronPrecondDeltaMixer,
                       params=dict(variant=variant, num_heads=num_heads, head_dim=head_dim, num_v_heads=num_v_heads,
                                   squash_x=squash_x, cp_layout=cp_layout, backend=backend))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=mixer, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm, mlp=get_mlp_module_spec_for_backend(backend=local), mlp_bda=get_bias_dropout_add))


def pdelta_block_spec(num_layers: int, variant: str = "pgdn", *, attention_every: int = 0,
                      **mixer_kwargs) -> TransformerBlockSubmodules:
    """Layer specs for a block: the mixer everywhere, or (``attention_every = k``) softmax attention as every
    k-th layer (layers k, 2k, ...; 1-based), as hybrid models do. Megatron's local attention has no CP: use
    Transformer Engine's attention spec for hybrids under CP."""
    mixer = pdelta_layer_spec(variant, **mixer_kwargs)
    attention = get_gpt_layer_local_spec(normalization="RMSNorm")
    specs = [attention if attention_every and (i + 1) % attention_every == 0 else mixer for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs)
