"""The CP numerics study script (issue 8) runs end to end on CPU: 4 gloo processes, CP over 2 and 4 ranks in
one job, every output and gradient at float32 round-off from the single-process answer."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numerics_study_on_cpu(tmp_path):
    out = tmp_path / "numerics.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           os.path.join(ROOT, "benchmarks", "numerics_cp.py"), "--device", "cpu", "--dtype", "float32",
           "--T", "512", "--H", "2", "--K", "16", "--V", "16", "--variants", "pkda", "--power-steps", "3",
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.load(open(out))["rows"]
    assert [r["ranks"] for r in rows] == [2, 4]
    for r in rows:
        assert {"o", "final_S", "dq", "dk", "dv", "dbeta", "dg", "dg_atk", "dbeta_atk"} <= set(r)
        assert r["max_rel_rms"] < 1e-5, r
        assert 0 < r["piece_amplification_random"] < float("inf")
