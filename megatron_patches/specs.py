"""Megatron-core layer specs: pure PDN/PGDN/PKDA stacks and hybrids with softmax attention every k-th layer.

Built only from Megatron's local (non-Transformer-Engine) modules plus :class:`MegatronPrecondDeltaMixer`, so
they run wherever megatron-core imports (apex and TE optional). Tested with megatron-core 0.16.1.
"""
from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ..layers import rms_norm
from .mixer import MegatronPrecondDeltaMixer


class RMSNorm(torch.nn.Module):
    """RMSNorm for Megatron layer specs that also works with sequence parallelism without apex or Transformer
    Engine (Megatron's torch fallback refuses it): its weight is marked ``sequence_parallel`` so the gradient
    reduction sums its per-TP-rank partial gradients."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def pdelta_layer_spec(variant: str = "pgdn", *, num_heads: int | None = None, head_dim: int | None = None,
                      num_v_heads: int | None = None, squash_x: float = 1.5, cp_layout: str = "zigzag",
                      backend: str = "auto") -> ModuleSpec:
    """A ``TransformerLayer`` whose ``self_attention`` is the preconditioned delta-rule mixer (pre-norm RMSNorm,
    bias-dropout-add, Megatron's MLP). Mixer arguments default to the config's heads and kv_channels."""
    local = LocalSpecProvider()
    norm = RMSNorm
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
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def build_gpt_model(config, *, vocab_size: int, max_sequence_length: int, variant: str = "pgdn",
                    attention_every: int = 0, pg_collection=None, **mixer_kwargs):
    """A Megatron ``GPTModel`` (embeddings, tied output layer, vocab-parallel loss) over our block spec.

    No position embeddings unless there are softmax-attention layers (``attention_every``), which get RoPE.
    Call it with this CP rank's tokens in Megatron's layout: ``model(input_ids, position_ids=None,
    attention_mask=None, labels=labels)`` returns the per-token loss [b, s_local].
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = pdelta_block_spec(config.num_layers, variant, attention_every=attention_every, **mixer_kwargs)
    return GPTModel(config, spec, vocab_size, max_sequence_length,
                    position_embedding_type="rope" if attention_every else "none",
                    share_embeddings_and_output_weights=True, pg_collection=pg_collection)


def pdelta_mamba_stack_spec(variant: str = "pgdn", **mixer_kwargs) -> ModuleSpec:
    """A ``MambaStack`` spec whose mixer symbol ``M`` is our mixer (``-`` MLP, ``*`` Megatron attention), for
    Megatron's hybrid models: ``MambaModel(config, pdelta_mamba_stack_spec("pkda"), ...,
    hybrid_override_pattern="M-M-M*-")``. The mixer accepts the Mamba slot's constructor arguments."""
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer

    local = LocalSpecProvider()
    mixer = ModuleSpec(module=MegatronPrecondDeltaMixer, params=dict(variant=variant, **mixer_kwargs))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=RMSNorm, mlp=get_mlp_module_spec_for_backend(backend=local), mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=RMSNorm, mixer=mixer, mamba_bda=get_bias_dropout_add)),
        attention_layer=get_gpt_layer_local_spec(normalization="RMSNorm"), mlp_layer=mlp))


def build_hybrid_stack(config, pattern: str, variant: str = "pgdn", *, pg_collection=None, post_layer_norm=True,
                       **mixer_kwargs):
    """Build the hybrid stack for ``pattern`` (e.g. "M-M-M*-"), hiding Megatron's API drift: the pattern is a
    string ``hybrid_override_pattern`` up to 0.17 and a ``layer_type_list`` in 0.18+ (HybridStack)."""
    import inspect

    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    spec = pdelta_mamba_stack_spec(variant, **mixer_kwargs)
    params = inspect.signature(spec.module.__init__).parameters
    layout = {"layer_type_list": list(pattern)} if "layer_type_list" in params \
        else {"hybrid_override_pattern": pattern}
    return build_module(spec, config, post_layer_norm=post_layer_norm,
                        pg_collection=pg_collection or ProcessGroupCollection.use_mpu_process_groups(), **layout)
