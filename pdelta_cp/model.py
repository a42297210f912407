"""A small pure-PyTorch language model around the mixer: pre-norm blocks, SwiGLU MLP, tied embeddings.

Used by the training CLI on any number of CP ranks (each rank holds its own tokens of every sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .attention import CausalSelfAttention
from .layers import MixerConfig, PrecondDeltaMixer, RMSNorm


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 8
    head_dim: int = 128
    num_v_heads: int | None = None
    variant: str = "pgdn"
    squash_x: float = 1.5
    hidden_ratio: float = 4.0
    norm_eps: float = 1e-6
    recompute: bool = False  # activation recomputation per block
    fp32_residual: bool = True  # False: under autocast the residual stream (and what recompute keeps) is bf16
    attention_every: int = 0  # hybrid: softmax attention as every k-th layer (layers k, 2k, ...); 0: none

    def mixer(self) -> MixerConfig:
        return MixerConfig(d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
                           num_v_heads=self.num_v_heads, variant=self.variant, squash_x=self.squash_x,
                           norm_eps=self.norm_eps,
                           a_log_init_lower=1.0 if self.variant in ("pkda", "kda") else 0.0)

    @property
    def intermediate_size(self) -> int:
        return 256 * -(-int(self.d_model * self.hidden_ratio * 2 / 3) // 256)


class _SiluGate(torch.autograd.Function):
    """[gate | up] [..., 2H] -> silu(gate) * up [..., H] with the same kernels (and numerics) as autograd of that
    formula, keeping only the input for backward (autograd also keeps silu(gate)) and writing both gradient
    halves into one buffer (autograd would concatenate them: one more copy of the input's size)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        d_gate.copy_(torch.ops.aten.silu_backward(dy * up, gate))
        d_up.copy_(dy * F.silu(gate))
        return d


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(_SiluGate.apply(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: bool = False):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = CausalSelfAttention(cfg.d_model, cfg.num_heads) if attention else PrecondDeltaMixer(cfg.mixer())
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.intermediate_size)

    def forward(self, x: Tensor, **cp) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x), **cp)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """tokens [B, T_local] -> logits [B, T_local, vocab]; ``cp`` keywords go to every mixer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        every = cfg.attention_every
        self.blocks = nn.ModuleList(Block(cfg, attention=bool(every) and (i + 1) % every == 0)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            for m in block.mlp.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: Tensor, return_hidden: bool = False, **cp) -> Tensor:
        """Logits [B, T_local, vocab], or with ``return_hidden`` the final normed states [B, T_local, d] (for a
        loss that applies the tied output layer in chunks: :mod:`pdelta_cp.train.loss`)."""
        x = self.embed(tokens)
        device = x.device.type
        if not self.cfg.fp32_residual and torch.is_autocast_enabled(device):  # as Megatron without fp32 residual
            x = x.to(torch.get_autocast_dtype(device))
        for block in self.blocks:
            if self.cfg.recompute and self.training:
                x = checkpoint(lambda h, b=block: b(h, **cp), x, use_reentrant=False)
            else:
                x = block(x, **cp)
        x = self.norm(x)
        return x if return_hidden else F.linear(x, self.embed.weight)  # tied embeddings

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
