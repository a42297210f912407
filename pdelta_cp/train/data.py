"""The embedded default dataset: synthetic multi-query associative recall (MQAR, as in Zoology).

A sample lists ``num_kv_pairs`` (key, value) pairs, then asks for the values of keys again at random later
positions: the model sees a key and must predict its value at that position (label = value, elsewhere
-100). Keys come from the lower half of the vocabulary, values from the upper half, 0 is filler. Batches
are a pure function of (seed, step, data-parallel rank), so every CP rank of a data-parallel group draws
the same samples and a resumed run sees exactly the data an uninterrupted run would.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100


def mqar_batch(*, vocab_size: int, seq_len: int, batch_size: int, num_kv_pairs: int, seed: int, step: int,
               dp_rank: int = 0) -> tuple[Tensor, Tensor]:
    """tokens, labels [batch_size, seq_len] (int64)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    half = vocab_size // 2
    n = num_kv_pairs
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    for b in range(batch_size):
        keys = torch.randperm(half - 1, generator=gen)[:n] + 1
        values = torch.randint(half, vocab_size, (n,), generator=gen)
        tokens[b, 0:2 * n:2] = keys
        tokens[b, 1:2 * n:2] = values
        slots = torch.randperm(seq_len - 2 * n, generator=gen)[:n] + 2 * n
        order = torch.randperm(n, generator=gen)
        tokens[b, slots] = keys[order]
        labels[b, slots] = values[order]
    return tokens, labels
