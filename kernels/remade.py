"""Forward tensors that backward makes again from smaller ones instead of keeping them: saved-tensor recipes.

The normalised queries and keys q̂, k̂, the write keys P and PKDA's per-channel Γ ([Nc, H or HV, C, K] float32,
512 bytes per token and head each at K = 128) are read by several stages in backward. Kept from forward, they are
alive through the backward's memory peak (the state pass's chunk gradients), where no stage reads them. With a
recipe, a stage that would save such a tensor saves the recipe's inputs instead — the op's own q, k and g, the
per-row norms, the entering preconditioner states: nothing new — and its backward makes the tensor again
(bitwise: the same kernel on the same inputs). As fla-core re-normalises q and k in its backward.

    t = register(t, fn, *inputs)          # forward, where t is made: fn(*inputs) gives t again
    save(ctx, *tensors, share=...)        # in place of ctx.save_for_backward
    rest = load(ctx)[1]                   # in place of ctx.saved_tensors (see load for the lazy part)

``share``: stages that run after the peak (the WY stage, the write keys, the preconditioner's chunk ends) share one
remade copy, dropped when the last of them has read it; the others (the output stage, the state pass: at or before
the peak) remake what they need for themselves and drop it with their backward. Recipes hold no tensor on ``ctx``
(per-block recompute frees only saved tensors). PDELTA_KEEP_KEYS=1 registers nothing: everything is kept, as before
(a faster backward for 1.5 KB more per token and head at the peak).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_RECIPES = WeakTensorKeyDictionary()  # tensor -> (RemadeOnce, inputs): alive while the tensor is


class RemadeOnce:
    """Tensors remade in backward by ``fn`` from saved inputs, once for every registered reader: the WY outputs
    (stages.Recompute), the chunk states (stages._States) and each recipe's tensor for its sharing readers.

    Dropped as soon as the last registered reader has read them: the autograd nodes (and so this cache) live
    until the whole backward ends, so a kept copy would pile up over all layers (12 KB per token per layer at
    the 340M shape: ~69 GiB per GPU at 1M tokens on 4 GPUs). A second backward through the graph remakes them.
    If autograd prunes a registered reader (a loss on the final state only), the outputs stay until the graph is
    freed — correct, only not early.
    """

    def __init__(self, fn: Callable):
        self.fn, self.out = fn, None
        self.readers = self.unread = 0

    def register(self) -> None:
        """One more reader will read the outputs in backward."""
        self.readers += 1
        self.unread = self.readers

    def make(self, inputs) -> object:
        """fn's outputs for a reader of its own (not cached, not counted)."""
        with torch.no_grad():
            return self.fn(*inputs)

    def __call__(self, inputs: Callable[[], tuple]) -> object:
        """The outputs; ``inputs()`` gives fn's inputs, called only when they are not cached (they may be remade
        themselves: see :func:`load`)."""
        out = self.out if self.out is not None else self.make(inputs())
        self.unread -= 1
        if self.unread > 0:
            self.out = out
        else:  # the last reader: the tensors die with its backward
            self.out, self.unread = None, self.readers
        return out


def enabled() -> bool:
    return torch.is_grad_enabled() and os.environ.get("PDELTA_KEEP_KEYS") != "1"


def register(t: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Stages that :func:`save` ``t`` keep ``inputs`` instead and remake it as ``fn(*inputs)`` (no gradient;
    ``fn`` must hold no activation — constants, or a cached chunk plan — and give bitwise the same values). Inputs
    may have recipes of their own. Returns t."""
    if enabled():
        _RECIPES[t] = (RemadeOnce(fn), inputs)
    return t


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``, with t's recipe (a new tensor object: the registry knows tensors by identity)."""
    out = t.detach()
    entry = _RECIPES.get(t)
    if entry is not None:
        _RECIPES[out] = entry
    return out


def _plan(t, flat: list, share: bool):
    """Append what stands for ``t`` to ``flat``; return its plan: None (t itself) or (recipe, children, share)."""
    entry = _RECIPES.get(t) if isinstance(t, torch.Tensor) else None
    if entry is None:
        flat.append(t)
        return None
    recipe, inputs = entry
    if share:
        recipe.register()
    return recipe, tuple(_plan(i, flat, share) for i in inputs), share


def _size(plan) -> int:
    return 1 if plan is None else sum(_size(c) for c in plan[1])


def save(ctx, *tensors, share: bool = False) -> None:
    """``ctx.save_for_backward(*tensors)``, with every registered tensor replaced by its recipe's inputs."""
    flat: list = []
    ctx.remade_plans = tuple(_plan(t, flat, share) for t in tensors)
    ctx.save_for_backward(*flat)


def _build(plan, saved, memo: dict):
    if plan is None:
        return next(saved)
    recipe, children, share = plan
    inputs = [_build(c, saved, memo) for c in children]
    if share:
        return recipe(lambda: inputs)
    if id(recipe) not in memo:  # one private remake per backward call, however often it is read there
        memo[id(recipe)] = recipe.make(inputs)
    return memo[id(recipe)]


def load(ctx, lazy: int = 0) -> tuple[Callable[[], tuple], tuple]:
    """What :func:`save` saved, as (a function giving the first ``lazy`` tensors, made only when called; the rest).
    Reads ``ctx.saved_tensors`` once (non-reentrant checkpointing refuses a second)."""
    saved, plans, memo = ctx.saved_tensors, ctx.remade_plans, {}
    split = sum(_size(p) for p in plans[:lazy])

    def first() -> tuple:
        head = iter(saved[:split])
        return tuple(_build(p, head, memo) for p in plans[:lazy])

    rest = iter(saved[split:])
    return first, tuple(_build(p, rest, memo) for p in plans[lazy:])
