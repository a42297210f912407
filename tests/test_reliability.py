"""Never lose work: checkpoint verification and fallback, a killed rank restarted by torchrun, NaN steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pdelta_cp.distributed import free_port
from pdelta_cp.train import checkpoint

BIN = os.path.dirname(sys.executable)
SMALL = ["--set", "steps=8", "--set", "log_every=1", "--set", "data.seq_len=64", "--set", "data.batch_size=4",
         "--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.head_dim=16",
         "--set", "optim.warmup_steps=2", "--set", "checkpoint_every=2"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _cli(out, *extra, env=None, nproc=None):
    cmd = [sys.executable, "-m", "pdelta_cp.cli", "train", "--config", "tiny", "--out", str(out), *SMALL, *extra]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or _env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_corrupted_or_truncated_checkpoints_fall_back(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(str(tmp_path), {"step": step, "w": torch.full((100,), float(step))}, step, keep=3)
    assert [e["step"] for e in checkpoint.read_manifest(str(tmp_path))] == [1, 2, 3]
    with open(tmp_path / "checkpoint-3.pt", "r+b") as f:  # flip bytes: same size, wrong checksum
        f.seek(100)
        f.write(b"\x00\xff" * 8)
    with open(tmp_path / "checkpoint-2.pt", "r+b") as f:  # truncate
        f.truncate(50)
    with pytest.warns(RuntimeWarning) as record:
        state = checkpoint.load_latest(str(tmp_path))
    assert state["step"] == 1
    messages = " ".join(str(w.message) for w in record)
    assert "SHA-256" in messages and "truncated" in messages
    os.remove(tmp_path / "checkpoint-1.pt")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no usable checkpoint"):
        checkpoint.load_latest(str(tmp_path))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(5):
        checkpoint.save(str(tmp_path), {"step": step}, step, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pt", "checkpoint-4.pt", "checkpoint.json"]


def test_killed_rank_is_restarted_and_training_matches(tmp_path):
    """Rank 1 dies at step 5 of a CP=2 run; torchrun restarts the job, which resumes from step 4."""
    _cli(tmp_path / "straight")
    reference = _losses(tmp_path / "straight")
    out = tmp_path / "faulty"
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "pdelta_cp.cli", "train", "--config", "tiny", "--out", str(out), *SMALL, "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=_env(PDELTA_FAULT_STEP="5", PDELTA_FAULT_RANK="1", MASTER_PORT=str(free_port())))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "injected failure at step 5" in log
    assert "from step 4" in log  # the restarted job resumed from the last checkpoint
    assert _losses(out) == reference


def test_nan_step_is_reported_and_skipped(tmp_path):
    log = _cli(tmp_path, env=_env(PDELTA_NAN_STEP="3", PDELTA_FAULT_RANK="1"))
    assert "step 4 skipped: non-finite loss on rank(s) [1]" in log
    assert "rank 1: non-finite loss at step 4" in log
    losses = _losses(tmp_path)
    assert len(losses) == 7 and all(x == x for x in losses)  # step 4 not logged; no NaN


def test_resume_with_another_cp_degree(tmp_path):
    _cli(tmp_path / "a", "--set", "parallel.cp=1", nproc=1)
    straight = _losses(tmp_path / "a")
    _cli(tmp_path / "b", "--set", "stop_at=4")  # CP=2, 2 processes
    _cli(tmp_path / "b", "--set", "parallel.cp=1", "--resume", nproc=1)
    resumed = _losses(tmp_path / "b")
    assert len(resumed) == 8
    assert all(abs(a - b) < 1e-4 * max(1.0, abs(a)) for a, b in zip(straight, resumed))
