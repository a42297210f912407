"""benchmarks/kernel_resources.py: compiles a chunk kernel for sm_90a on this (GPU-less) machine and reads
registers and spills from ptxas. Run in a subprocess: the tool compiles for real, not under the interpreter."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reports_registers_and_spills_without_a_gpu(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton wheel ships no ptxas")
    out = tmp_path / "res.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--K", "64",
                           "--V", "64", "--only", "state_bwd", "wy_bwd", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"state_bwd", "wy_bwd"}
    for row in rows.values():
        assert 0 < row["registers"] <= 255 and row["spill_store_bytes"] >= 0 and row["shared_bytes"] > 0
