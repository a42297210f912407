"""Layout bookkeeping: pieces cover the stream once, segments follow sequences, Megatron's zigzag order."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdelta_cp.cp.layout import local_token_index, split_stream, stream_layout


def test_zigzag_is_megatron_split():
    # Megatron get_batch_on_this_cp_rank: 2W chunks, rank r keeps chunks r and 2W-1-r
    assert split_stream(16, 2, 0, "zigzag") == [(0, 4), (12, 16)]
    assert split_stream(16, 2, 1, "zigzag") == [(4, 8), (8, 12)]
    assert local_token_index(8, 4, 1, "zigzag") == [1, 6]


def test_indivisible_stream_is_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        split_stream(10, 2, 0, "zigzag")


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 5), layout=st.sampled_from(["contiguous", "zigzag"]),
       cuts=st.lists(st.integers(1, 200), min_size=0, max_size=6), local=st.integers(1, 20))
def test_pieces_and_segments_partition_the_stream(world, layout, cuts, local):
    per = 2 if layout == "zigzag" else 1
    total = world * per * local
    cu = sorted({0, total, *[c % total for c in cuts]})
    covered = []
    for rank in range(world):
        lay = stream_layout(1, total // world, cu, world, rank, layout)
        covered += [t for s, e in lay.pieces for t in range(s, e)]
        # segments tile the local stream and never cross a sequence boundary
        assert lay.segments[0].start == 0 and lay.segments[-1].end == lay.num_tokens
        for a, b in zip(lay.segments, lay.segments[1:]):
            assert a.end == b.start
        offsets, off = [], 0
        for s, e in lay.pieces:
            offsets.append(off)
            off += e - s
        for seg in lay.segments:
            g0 = lay.pieces[seg.piece][0] + seg.start - offsets[seg.piece]
            g1 = g0 + seg.end - seg.start
            lo, hi = lay.seq_bounds[seg.seq]
            assert lo <= g0 < g1 <= hi
            assert seg.starts_sequence == (g0 == lo) and seg.ends_sequence == (g1 == hi)
        assert [gp.start for gp in lay.order] == sorted(gp.start for gp in lay.order)
    assert sorted(covered) == list(range(total))


def test_zigzag_per_sequence_is_megatron_thd_split():
    from pdelta_cp.cp.layout import rank_pieces

    # THD: every sequence cut into 2W pieces; rank r keeps pieces r and 2W-1-r of each, sequence by sequence
    assert rank_pieces(2, 0, "zigzag_per_sequence", 12, [0, 4, 12]) == [(0, 1), (3, 4), (4, 6), (10, 12)]
    assert rank_pieces(2, 1, "zigzag_per_sequence", 12, [0, 4, 12]) == [(1, 2), (2, 3), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="pad each sequence to a multiple of 4"):
        rank_pieces(2, 0, "zigzag_per_sequence", 10, [0, 6, 10])
