"""benchmarks/graph_stats.py: the peak-memory map names what is alive at the peak, and it adds up."""
import os
import re
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_peak_map_lists_the_live_storages_by_the_line_that_made_them():
    import graph_stats

    stats = graph_stats.graph_stats("pgdn", T=130, H=1, K=16, V=16, dtype=torch.float32, backend="triton",
                                    device="cpu")
    entries = stats["alive_at_peak"]
    assert entries, stats
    per_token = [float(e.split(" B/token")[0]) for e in entries]
    assert per_token == sorted(per_token, reverse=True)
    assert sum(per_token) <= stats["peak_bytes_per_token"] + 1e-6
    # the per-chunk states [Nc, HV, K, V] made by the state pass are among the largest live storages
    assert any(re.search(r"\(3, 1, 16, 16\) torch.float32 at kernels/state_pass.py:\d+", e) for e in entries), entries
    assert all(e.split(": ", 1)[1].split()[0] in ("fwd", "bwd") for e in entries)
