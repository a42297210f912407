"""Which tokens of the global stream each CP rank holds, and how its local tokens split into segments.

Pure Python bookkeeping (no communication), identical on every rank.

The *global stream* is the whole packed input: with ``cu_seqlens`` the one packed row of all sequences;
without it the B samples of length T_global laid end to end (sample b = sequence b). A *piece* is a run of
consecutive global tokens held by one rank; a rank holds one piece per sample (``contiguous``) or two
(``zigzag``: pieces r and 2W-1-r of 2W equal pieces, Megatron's load-balanced split), and passes them to
the op concatenated in that order; ``zigzag_per_sequence`` (Megatron's THD format) applies the zigzag
to every packed sequence on its own. A *segment* is the part of one sequence inside one piece: the unit that
the chunk algorithm runs on with one initial state.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

LAYOUTS = ("contiguous", "zigzag", "zigzag_per_sequence")


def pieces_per_sample(layout: str) -> int:
    return 1 if layout == "contiguous" else 2


def split_sequences(cu_seqlens: list[int], world: int, rank: int) -> list[tuple[int, int]]:
    """Megatron's THD split: every sequence is cut into 2W equal pieces and ``rank`` holds pieces r and
    2W-1-r of each, in sequence order (each sequence's length must be a multiple of 2W)."""
    pieces = []
    for n, (s, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        if (e - s) % (2 * world):
            raise ValueError(
                f"cp_layout='zigzag_per_sequence' cuts every sequence into {2 * world} equal pieces, but sequence "
                f"{n} has {e - s} tokens; pad each sequence to a multiple of {2 * world} (Megatron pads THD "
                f"sequences the same way)")
        m = (e - s) // (2 * world)
        back = 2 * world - 1 - rank
        pieces += [(s + rank * m, s + (rank + 1) * m), (s + back * m, s + (back + 1) * m)]
    return pieces


def rank_pieces(world: int, rank: int, layout: str, total: int, cu_seqlens: list[int] | None = None
                ) -> list[tuple[int, int]]:
    """The pieces (global [start, end), local order) that ``rank`` holds of a stream of ``total`` tokens."""
    if layout == "zigzag_per_sequence":
        return split_sequences(cu_seqlens if cu_seqlens else [0, total], world, rank)
    return split_stream(total, world, rank, layout)


def split_stream(total: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global [start, end) of the pieces that ``rank`` holds of a stream of ``total`` tokens, in local order."""
    parts = world * pieces_per_sample(layout)
    if total % parts:
        raise ValueError(
            f"cp_layout={layout!r} cuts the stream into {parts} equal pieces, but its length {total} is not a "
            f"multiple of {parts}; pad the stream (e.g. to a multiple of {parts}) or change the CP size."
        )
    n = total // parts
    if layout == "contiguous":
        return [(rank * n, (rank + 1) * n)]
    back = 2 * world - 1 - rank
    return [(rank * n, (rank + 1) * n), (back * n, (back + 1) * n)]


@dataclass(frozen=True)
class Segment:
    """Local tokens [start, end) of global sequence ``seq`` inside local piece ``piece``."""

    start: int
    end: int
    seq: int
    piece: int
    starts_sequence: bool  # its first token is the first token of the sequence
    ends_sequence: bool  # its last token is the last token of the sequence


@dataclass(frozen=True)
class GlobalPiece:
    """One piece of the stream, as every rank sees it (used to fold summaries in stream order)."""

    start: int
    end: int
    owner: int  # rank that holds it
    index: int  # its position among the owner's pieces
    starts_sequence: bool
    first_seq: int  # sequence of its first token


@dataclass(frozen=True)
class StreamLayout:
    """One rank's view: its pieces and segments, and all pieces of the stream in global order."""

    world: int
    rank: int
    seq_bounds: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[int, int], ...]  # this rank's pieces, global bounds, local order
    segments: tuple[Segment, ...]
    order: tuple[GlobalPiece, ...]

    @property
    def num_tokens(self) -> int:
        return sum(e - s for s, e in self.pieces)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_bounds)

    def first_segment(self, piece: int) -> int:
        return next(i for i, s in enumerate(self.segments) if s.piece == piece)

    def last_segment(self, piece: int) -> int:
        return max(i for i, s in enumerate(self.segments) if s.piece == piece)


def build_layout(
    seq_bounds: list[tuple[int, int]], pieces_by_rank: list[list[tuple[int, int]]], rank: int
) -> StreamLayout:
    """Assemble the view of ``rank`` from the sequences and every rank's pieces (each in local order)."""
    seq_starts = [s for s, _ in seq_bounds]
    seq_ends = {e for _, e in seq_bounds}
    starts_set = set(seq_starts)

    def seq_of(token: int) -> int:
        return bisect.bisect_right(seq_starts, token) - 1

    segments, offset = [], 0
    for p, (start, end) in enumerate(pieces_by_rank[rank]):
        t = start
        while t < end:
            seq = seq_of(t)
            stop = min(end, seq_bounds[seq][1])
            segments.append(Segment(offset + t - start, offset + stop - start, seq, p, t in starts_set,
                                    stop in seq_ends and stop == seq_bounds[seq][1]))
            t = stop
        offset += end - start
    order = sorted(
        (GlobalPiece(s, e, r, i, s in starts_set, seq_of(s))
         for r, pieces in enumerate(pieces_by_rank) for i, (s, e) in enumerate(pieces) if e > s),
        key=lambda gp: gp.start,
    )
    return StreamLayout(len(pieces_by_rank), rank, tuple(seq_bounds), tuple(pieces_by_rank[rank]),
                        tuple(segments), tuple(order))


def stream_layout(
    batch: int, local_len: int, cu_seqlens: list[int] | None, world: int, rank: int, layout: str
) -> StreamLayout:
    """The layout of one call: ``batch`` rows of ``local_len`` local tokens on each of ``world`` ranks.

    Without ``cu_seqlens`` every row is its own sequence of ``world * local_len`` tokens, split by ``layout``.
    With ``cu_seqlens`` (global boundaries, batch 1) the packed stream of ``cu_seqlens[-1]`` tokens is split.
    """
    if world == 1:  # a zigzag of one rank holds its pieces in order: the contiguous stream
        if layout != "contiguous":  # same divisibility rules as with more ranks
            rank_pieces(1, 0, layout, cu_seqlens[-1] if cu_seqlens else local_len, cu_seqlens)
        layout = "contiguous"
    if cu_seqlens is None:
        total = world * local_len
        seq_bounds = [(b * total, (b + 1) * total) for b in range(batch)]
        pieces = [[(b * total + s, b * total + e) for b in range(batch)
                   for s, e in rank_pieces(world, r, layout, total)] for r in range(world)]
    else:
        seq_bounds = list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
        pieces = [rank_pieces(world, r, layout, cu_seqlens[-1], cu_seqlens) for r in range(world)]
    return build_layout(seq_bounds, pieces, rank)


def local_token_index(total: int, world: int, rank: int, layout: str, cu_seqlens: list[int] | None = None
                      ) -> list[int]:
    """Positions (along T of a [B, T_global, ...] or packed [1, T_global, ...] tensor) that ``rank`` holds.
    ``cu_seqlens`` (global) is needed for ``zigzag_per_sequence``."""
    return [t for s, e in rank_pieces(world, rank, layout, total, cu_seqlens) for t in range(s, e)]


def shard(x, world: int, rank: int, layout: str = "contiguous", dim: int = 1, cu_seqlens=None):
    """This rank's share of a full-sequence tensor along ``dim`` (tokens): what to pass to the op under CP."""
    import torch

    cu = None if cu_seqlens is None else [int(c) for c in cu_seqlens]
    idx = torch.tensor(local_token_index(x.shape[dim], world, rank, layout, cu), device=x.device)
    return x.index_select(dim, idx)
