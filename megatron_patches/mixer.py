"""PDN / PGDN / PKDA token mixers for Megatron-core: tensor parallel over heads, context parallel over tokens.

Drops into ``TransformerLayerSubmodules.self_attention`` (see :mod:`.specs`). Megatron calls it with
``hidden_states`` [s, b, h] (s = this CP rank's tokens; with sequence parallelism s/tp, which the
column-parallel projections all-gather) and expects ``(output [s, b, h], bias)``. The per-token math is
:func:`pdelta_cp.layers.mixer_core`, shared with the plain-PyTorch module, so both compute the same function.

Tensor parallelism: every projection is column-parallel over heads, the output projection row-parallel; the
per-head parameters (A_log, dt_bias, the preconditioner's gate, gain and centre, conv channels) hold this TP
rank's heads and are initialised from the full tensor, so any TP size starts from the same model.
Context parallelism: the CP group comes from ``pg_collection.cp`` (or Megatron's parallel state), and the
token layout is Megatron's load-balanced split (``zigzag``), exactly what ``get_batch_on_this_cp_rank`` gives.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .layout import check_layout
from ..layers import (_DECAY, VARIANTS, MixerConfig, MixerProjections, RMSNorm, _inverse_softplus_dt, mixer_core,
                      rms_norm)


def _local(full: torch.Tensor, rank: int, size: int) -> nn.Parameter:
    """This TP rank's contiguous slice (dim 0) of a tensor initialised at full size."""
    n = full.shape[0] // size
    return nn.Parameter(full[rank * n:(rank + 1) * n].clone())


class _TPSharedRMSNorm(RMSNorm):
    """The per-head output norm: one weight shared by all heads, whose heads live on different TP ranks, so
    its gradient is summed over the TP group (identity forward, all-reduce backward)."""

    def __init__(self, dim: int, eps: float, tp_group):
        super().__init__(dim, eps)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        return rms_norm(x, weight, self.eps)


def _group_or_none(group):
    if group is None or torch.distributed.get_world_size(group) == 1:
        return None
    return group


class MegatronPrecondDeltaMixer(MegatronModule):
    """Megatron ``self_attention`` module computing the preconditioned delta rule.

    Params (set through ``ModuleSpec.params``): ``variant`` (pdn|pgdn|pkda|deltanet|gdn|kda), ``num_heads``,
    ``head_dim``, ``num_v_heads`` (defaults: config.num_attention_heads, config.kv_channels), ``squash_x``,
    ``cp_layout`` ("zigzag" = Megatron's split), ``backend``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection=None, *,
                 variant: str = "pgdn", num_heads: int | None = None, head_dim: int | None = None,
                 num_v_heads: int | None = None, squash_x: float = 1.5, cp_layout: str = "zigzag",
                 backend: str = "auto", **unused):  # cp_comm_type, pp_layer_offset, name... (version drift)
        super().__init__(config=config)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.layer_number = layer_number
        tp_group = getattr(pg_collection, "tp", None) or parallel_state.get_tensor_model_parallel_group()
        self.cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
        self.tp_group = tp_group
        tp, tp_rank = torch.distributed.get_world_size(tp_group), torch.distributed.get_rank(tp_group)
        H = num_heads or config.num_attention_heads
        K = head_dim or config.kv_channels or config.hidden_size // H
        HV = num_v_heads or H
        if H % tp or HV % tp:
            raise ValueError(f"the key heads ({H}) and value heads ({HV}) must be divisible by the tensor-parallel "
                             f"size {tp}")
        self.cfg = MixerConfig(d_model=config.hidden_size, num_heads=H, head_dim=K, num_v_heads=HV, variant=variant,
                               squash_x=squash_x, norm_eps=config.layernorm_epsilon,
                               a_log_init_lower=1.0 if variant in ("pkda", "kda") else 0.0)
        self.H, self.HV, self.K = H // tp, HV // tp, K
        self.decay = _DECAY[variant]
        self.preconditioned = variant in ("pdn", "pgdn", "pkda")
        self.cp_layout, self.backend = cp_layout, backend
        d = config.hidden_size

        def column(out_features: int) -> tensor_parallel.ColumnParallelLinear:
            return tensor_parallel.ColumnParallelLinear(d, out_features, config=config,
                                                        init_method=config.init_method, bias=False,
                                                        gather_output=False, tp_group=tp_group)

        self.q_proj, self.k_proj, self.v_proj = column(H * K), column(H * K), column(HV * K)
        self.b_proj, self.b_atk_proj, self.a_atk_proj = column(HV), column(H), column(H)

        def full_conv(channels: int) -> torch.Tensor:
            return torch.randn(channels, 4) * 0.02

        self.q_conv = _local(full_conv(H * K), tp_rank, tp)
        self.k_conv = _local(full_conv(H * K), tp_rank, tp)
        self.v_conv = _local(full_conv(HV * K), tp_rank, tp)
        lo = max(self.cfg.a_log_init_lower, 1e-4)
        if self.decay == "scalar":
            self.a_proj = column(HV)
            self.dt_bias = _local(_inverse_softplus_dt(HV), tp_rank, tp)
            self.A_log = _local(torch.log(torch.empty(HV).uniform_(lo, 16)), tp_rank, tp)
        elif self.decay == "channel":
            # low rank d -> K (replicated) -> HV*K (column parallel): per-channel decay logits
            self.a_down = nn.Linear(d, K, bias=False)
            nn.init.normal_(self.a_down.weight, std=0.02)
            self.a_up = tensor_parallel.ColumnParallelLinear(K, HV * K, config=config, init_method=config.init_method,
                                                             bias=False, gather_output=False, tp_group=tp_group)
            self.dt_bias = _local(_inverse_softplus_dt(HV * K), tp_rank, tp)
            self.A_log = _local(torch.log(torch.empty(HV).uniform_(max(lo, 1.0), 16)), tp_rank, tp)
            self.g_down = nn.Linear(d, K, bias=False)
            nn.init.normal_(self.g_down.weight, std=0.02)
            self.g_up = tensor_parallel.ColumnParallelLinear(K, HV * K, config=config, init_method=config.init_method,
                                                             bias=True, gather_output=False, tp_group=tp_group)
            for w in (self.a_down.weight, self.g_down.weight):  # replicated; partial grads under SP
                w.sequence_parallel = config.sequence_parallel
        self.dt_bias_atk = _local(_inverse_softplus_dt(H), tp_rank, tp)
        self.A_log_atk = _local(torch.log(torch.empty(H).uniform_(lo, 16)), tp_rank, tp)
        self.log_atk_scale = nn.Parameter(torch.full((H // tp,), self.cfg.log_atk_scale_init))
        self.o_norm = _TPSharedRMSNorm(K, config.layernorm_epsilon, tp_group)
        self.o_proj = tensor_parallel.RowParallelLinear(HV * K, d, config=config,
                                                        init_method=config.output_layer_init_method, bias=False,
                                                        input_is_parallel=True, skip_bias_add=True,
                                                        tp_group=tp_group)
        for name in ("q_conv", "k_conv", "v_conv", "dt_bias", "A_log", "dt_bias_atk", "A_log_atk", "log_atk_scale"):
            if hasattr(self, name):  # TP-sharded along dim 0, like Megatron marks its parallel linears
                getattr(self, name).tensor_model_parallel = True
                getattr(self, name).partition_dim = 0
                getattr(self, name).partition_stride = 1

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view: own per-head parameters TP-sharded along dim 0, linears by Megatron,
        everything else replicated — so a checkpoint saved at one TP/CP layout loads at another."""
        import inspect

        from megatron.core.transformer import utils as mutils

        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis = {name: 0 for name in own if getattr(getattr(self, name, None), "tensor_model_parallel", False)}
        # megatron-core 0.16 added explicit process groups to these helpers; 0.15 reads parallel_state
        groups = {}
        if "tp_group" in inspect.signature(mutils.make_sharded_tensors_for_checkpoint).parameters:
            metadata = mutils.ensure_metadata_has_dp_cp_group(metadata)
            groups = {"tp_group": self.tp_group, "dp_cp_group": metadata["dp_cp_group"]}
        result = mutils.make_sharded_tensors_for_checkpoint(own, prefix, axis, sharded_offsets, **groups)
        child_groups = {"tp_group": self.tp_group} if groups else {}
        for name, module in self.named_children():
            result.update(mutils.sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                            **child_groups))
        return result

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **unused):
        """hidden_states [s, b, h] -> (output [s, b, h], bias None)."""
        def proj(layer, x):
            return layer(x)[0].transpose(0, 1)  # [s, b, n] -> [b, s, n]

        cu_seqlens, layout = None, self.cp_layout
        if packed_seq_params is not None:  # THD: [t, 1, h], sequences padded to a multiple of 2*cp
            if getattr(packed_seq_params, "qkv_format", "thd") != "thd":
                raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}")
            cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            layout = "zigzag_per_sequence"  # what get_thd_batch_on_this_cp_rank hands each rank
        decay = out_gate = None
        if self.decay == "scalar":
            decay = proj(self.a_proj, hidden_states)
        elif self.decay == "channel":
            decay = self.a_up(self.a_down(hidden_states))[0].transpose(0, 1)
            out_gate = self.g_up(self.g_down(hidden_states))[0].transpose(0, 1)
        p = MixerProjections(q=proj(self.q_proj, hidden_states), k=proj(self.k_proj, hidden_states),
                             v=proj(self.v_proj, hidden_states), beta=proj(self.b_proj, hidden_states),
                             decay=decay, g_atk=proj(self.a_atk_proj, hidden_states),
                             beta_atk=proj(self.b_atk_proj, hidden_states), out_gate=out_gate)
        cp_group = _group_or_none(self.cp_group)
        check_layout(layout, 1 if cp_group is None else torch.distributed.get_world_size(cp_group))
        o = mixer_core(self, p, cu_seqlens=cu_seqlens, cp_group=cp_group, cp_layout=layout, backend=self.backend)
        B, T = o.shape[:2]
        out, bias = self.o_proj(o.reshape(B, T, -1).transpose(0, 1).contiguous())
        return out, bias


__all__ = ["MegatronPrecondDeltaMixer"]
