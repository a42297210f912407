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


@pytest.mark.parametrize("T", [256, 250], ids=["whole_chunks", "padded"])
def test_glue_around_the_kernels_moves_only_per_token_scalars(T):
    """bf16 PGDN: the kernels read q, k, v and dO in the stream layout and write o, dq, dk and dv there in the
    input dtype (a segment's last chunk padded or not); K̂'s three gradients are summed in-kernel (GradHandoff).
    What PyTorch still moves is the per-token scalars β, g, g_atk, β_atk and per-sequence states: no site moves
    as much as one relayout of a [T, H, K] tensor (6K bytes per token and head: bf16 read, float32 written), and
    there is no autograd sum or cast of a [Nc, H, C, K] gradient."""
    import graph_stats

    H, K, V = 2, 32, 32
    stats = graph_stats.graph_stats("pgdn", T=T, H=H, K=K, V=V, dtype=torch.bfloat16, backend="triton",
                                    device="cpu")
    sites = stats["glue_traffic"]
    heaviest = max(float(e.split(" B/token")[0]) for e in sites) / H
    assert heaviest < 4 * K, sites
    autograd_sums = [e for e in sites if re.search(r"add at autograd (WriteKeys|WeightedSquares)Backward", e)]
    assert not autograd_sums, autograd_sums
    assert not [e for e in sites if "_to_copy at autograd StageBackward" in e], sites  # a returned gradient cast


def test_no_normalised_or_write_keys_alive_at_the_peak(monkeypatch):
    """q̂, k̂ and P are remade in backward (kernels/remade.py): none of the float32 [Nc, H, C, K] tensors that the l2
    norm or the write keys make in forward is alive at the peak; with PDELTA_KEEP_KEYS=1 at least k̂ and P are (and
    q̂ where the peak falls in the output stage's backward)."""
    import graph_stats

    def forward_keys_at_peak():
        stats = graph_stats.graph_stats("pgdn", T=256, H=2, K=32, V=32, dtype=torch.bfloat16, backend="triton",
                                        device="cpu")
        return [e for e in stats["alive_at_peak"]
                if re.search(r"fwd \S+ \(4, 2, 64, 32\) torch.float32 at kernels/(l2norm|preconditioner).py", e)]

    assert forward_keys_at_peak() == []
    monkeypatch.setenv("PDELTA_KEEP_KEYS", "1")
    assert len(forward_keys_at_peak()) >= 2


def test_settings_compare_switches_in_one_run():
    """``--settings``: one row per environment setting, each measured under it and restored after (keeping the
    keys saves more bytes for backward than remaking them)."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "graph_stats.py")
    env = {k: v for k, v in os.environ.items() if k != "PDELTA_KEEP_KEYS"}
    out = subprocess.run([sys.executable, script, "--variant", "pgdn", "--T", "130", "--H", "1", "--K", "16", "--V",
                          "16", "--settings", "", "PDELTA_KEEP_KEYS=1", ""], capture_output=True, text=True, env=env,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["settings"] for r in rows] == [{}, {"PDELTA_KEEP_KEYS": "1"}, {}]
    assert rows[1]["saved_bytes_per_token"] > rows[0]["saved_bytes_per_token"] == rows[2]["saved_bytes_per_token"]
