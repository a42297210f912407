"""Language-model loss over many tokens without materialising all logits.

At long context the output layer dominates memory: 256K tokens × 32K vocabulary is 32 GiB of float32 logits,
and autograd of a plain cross-entropy keeps them (and their softmax) for backward. Here the tokens are taken in
chunks; each chunk's logits live only inside a checkpointed function, so backward recomputes them one chunk
at a time and the peak is one chunk's logits. The result equals the whole-sequence loss (same reduction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    logits = F.linear(hidden, weight).float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != ignore_index)).sum().float()
    return loss, correct


def lm_loss_sums(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int,
                 chunk_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(summed cross-entropy, number of scored tokens, number predicted right) of ``hidden @ weight.T``.

    hidden [N, d] (any float dtype; logits are promoted to float32), weight [vocab, d], labels [N] (entries equal
    to ``ignore_index`` are not scored). ``chunk_tokens`` > 0 computes the logits ``chunk_tokens`` rows at a
    time and recomputes them in backward; 0 computes them at once (the fastest when they fit).
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: no chunking), got {chunk_tokens}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and labels [N]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    step = chunk_tokens or max(hidden.shape[0], 1)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], step):
        args = (hidden[start:start + step], weight, labels[start:start + step], ignore_index)
        if chunk_tokens and torch.is_grad_enabled():  # logits freed after forward, remade in backward
            part, right = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            part, right = _chunk_loss(*args)
        loss, correct = loss + part, correct + right
    return loss, (labels != ignore_index).sum().float(), correct
