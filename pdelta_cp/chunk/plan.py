"""Chunk bookkeeping: cut a packed token stream into fixed-size chunks that never cross a segment boundary.

A *segment* is a run of consecutive local tokens that belong to one sequence (a whole sequence, or the part
of it that one CP piece holds). Each segment is cut into chunks of ``chunk_size`` tokens; its last chunk is
padded. Padding tokens gather a zero row, which makes them identity steps of every recurrence (zero key,
zero gains, zero log-decay), so they change nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..indices import index_tensor


@dataclass(frozen=True)
class ChunkPlan:
    """Where every chunk's tokens live in the local stream.

    token_index [Nc, C]: index into the stream, ``num_tokens`` (a zero pad row) for padding.
    chunk_segment [Nc]: segment of each chunk; chunk_pos [Nc]: position of the chunk in its segment.
    seg_bounds: (start, end) of each segment in the stream. Chunks are ordered by segment, then position,
    so valid tokens appear in stream order when read chunk by chunk.
    """

    num_tokens: int
    chunk_size: int
    seg_bounds: tuple[tuple[int, int], ...]
    token_index: Tensor
    valid: Tensor
    valid_rows: Tensor  # flat indices (into Nc*C) of the real tokens, in stream order
    chunk_segment: Tensor
    chunk_pos: Tensor
    seg_first_chunk: tuple[int, ...]
    seg_num_chunks: tuple[int, ...]
    chunk_start: Tensor  # [Nc] int64: stream index of each chunk's first token (the kernels' stream addressing)
    chunk_len: Tensor  # [Nc] int32: its real tokens (C but in a segment's last chunk)
    dense: bool = False  # no padding: chunk c holds stream tokens [c*C, (c+1)*C), gather/scatter are views

    @property
    def num_chunks(self) -> int:
        return self.token_index.shape[0]

    @property
    def num_segments(self) -> int:
        return len(self.seg_bounds)

    def chunks_of(self, seg: int) -> slice:
        first = self.seg_first_chunk[seg]
        return slice(first, first + self.seg_num_chunks[seg])

    def gather(self, x: Tensor) -> Tensor:
        """[L, *rest] stream tensor -> [Nc, C, *rest] chunk tensor (padding = 0)."""
        if self.dense:
            return x.reshape((self.num_chunks, self.chunk_size) + x.shape[1:])
        padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])
        return padded[self.token_index]

    def scatter(self, xc: Tensor) -> Tensor:
        """[Nc, C, *rest] chunk tensor -> [L, *rest] stream tensor (drops padding)."""
        if self.dense:
            return xc.reshape((-1,) + xc.shape[2:])
        return xc.reshape((-1,) + xc.shape[2:]).index_select(0, self.valid_rows)  # no host sync


def make_chunk_plan(seg_bounds: list[tuple[int, int]], num_tokens: int, chunk_size: int, device) -> ChunkPlan:
    """The plan for segments ``seg_bounds`` (consecutive, covering ``[0, num_tokens)``).

    Cached: every layer of every step asks for the same plan, and building one copies index tensors to the
    device (a stream synchronisation each, see :mod:`pdelta_cp.indices`). Plans are read-only.
    """
    return _build_chunk_plan(tuple((int(s), int(e)) for s, e in seg_bounds), int(num_tokens), int(chunk_size),
                             torch.device(device))


@functools.lru_cache(maxsize=64)
def _build_chunk_plan(seg_bounds: tuple[tuple[int, int], ...], num_tokens: int, chunk_size: int,
                      device: torch.device) -> ChunkPlan:
    starts = torch.tensor([s for s, _ in seg_bounds], dtype=torch.long)
    lengths = torch.tensor([e - s for s, e in seg_bounds], dtype=torch.long)
    counts = (lengths + chunk_size - 1) // chunk_size
    firsts = torch.cumsum(counts, 0) - counts
    chunk_segment = torch.repeat_interleave(torch.arange(len(seg_bounds)), counts)
    chunk_pos = torch.arange(int(counts.sum())) - firsts[chunk_segment]
    chunk_start = starts[chunk_segment] + chunk_pos * chunk_size
    chunk_end = starts[chunk_segment] + lengths[chunk_segment]
    token_index = chunk_start[:, None] + torch.arange(chunk_size)[None, :]
    token_index = torch.where(token_index < chunk_end[:, None], token_index, num_tokens)
    return ChunkPlan(
        num_tokens=num_tokens,
        chunk_size=chunk_size,
        seg_bounds=tuple(seg_bounds),
        token_index=token_index.to(device),
        valid=(token_index < num_tokens).to(device),
        valid_rows=(token_index < num_tokens).reshape(-1).nonzero().squeeze(1).to(device),
        chunk_segment=chunk_segment.to(device),
        chunk_pos=chunk_pos.to(device),
        seg_first_chunk=tuple(firsts.tolist()),
        seg_num_chunks=tuple(counts.tolist()),
        chunk_start=chunk_start.to(device),
        chunk_len=(torch.minimum(chunk_end - chunk_start, torch.tensor(chunk_size))).to(torch.int32).to(device),
        dense=bool((lengths % chunk_size == 0).all()),  # every segment whole chunks: no padding anywhere
    )


def scan_chunks(plan: ChunkPlan, init: Tensor, step) -> tuple[Tensor, Tensor]:
    """Run a recurrence over the chunks of every segment, all segments side by side.

    init [Nseg, *S]: state at the start of each segment. ``step(chunk_ids, state) -> state`` advances the
    states of the given chunks (one per segment) by one chunk. Returns the state at the start of every chunk
    [Nc, *S] and the final state of every segment [Nseg, *S]. Sequential over chunk positions only.
    """
    states = init
    starts = [None] * plan.num_chunks
    pos = plan.chunk_pos.tolist()
    seg = plan.chunk_segment.tolist()
    by_pos: dict[int, list[int]] = {}
    for c, p in enumerate(pos):
        by_pos.setdefault(p, []).append(c)
    for p in sorted(by_pos):
        chunk_ids = by_pos[p]
        seg_ids = torch.tensor([seg[c] for c in chunk_ids], device=init.device)
        current = states[seg_ids]
        for i, c in enumerate(chunk_ids):
            starts[c] = current[i]
        states = states.index_put((seg_ids,), step(torch.tensor(chunk_ids, device=init.device), current))
    if plan.num_chunks == 0:
        return init.new_zeros((0,) + init.shape[1:]), states
    return torch.stack(starts), states


def diagonal_scan(plan: ChunkPlan, init: Tensor, decay: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal recurrence A <- decay_c * A + end_c over each segment's chunks, in log depth.

    init [Nseg, *S]; decay, end [Nc, *S]. Returns (state entering every chunk [Nc, *S], final state of every
    segment [Nseg, *S]). A Hillis-Steele scan over chunk positions: at step d every chunk absorbs the partial
    map of the chunk d places earlier in its segment. Differentiable; no chain over the chunks.
    """
    pos = plan.chunk_pos
    D, A = decay, end  # inclusive maps of chunks [first of segment .. c], built up in place of each chunk
    d = 1
    while d < max(plan.seg_num_chunks, default=1):
        has = (pos >= d).view((-1,) + (1,) * (D.dim() - 1))
        prev_D = torch.cat([D.new_ones((d,) + D.shape[1:]), D[:-d]])
        prev_A = torch.cat([A.new_zeros((d,) + A.shape[1:]), A[:-d]])
        D, A = torch.where(has, D * prev_D, D), torch.where(has, D * prev_A + A, A)
        d *= 2
    seg_init = init[plan.chunk_segment]
    after = D * seg_init + A  # state leaving each chunk
    first = (pos == 0).view((-1,) + (1,) * (D.dim() - 1))
    before = torch.where(first, seg_init, torch.cat([seg_init[:1], after[:-1]]))
    last = index_tensor([f + n - 1 for f, n in zip(plan.seg_first_chunk, plan.seg_num_chunks)], init.device)
    return before, after[last]
