"""The training entry point: self-launched CP, CP=2 equals CP=1, exact resume, config errors."""
import json
import os
import subprocess
import sys

import pytest

from pdelta_cp.train.config import load_config

SMALL = ["--set", "steps=6", "--set", "log_every=1", "--set", "data.seq_len=64", "--set", "data.batch_size=4",
         "--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.head_dim=16",
         "--set", "optim.warmup_steps=2"]


def _train(out, *extra, nproc=None):
    cmd = [sys.executable, "-m", "pdelta_cp.cli", "train", "--config", "tiny", "--out", str(out), *SMALL, *extra]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_cp2_training_equals_single_process_and_writes_outputs(tmp_path):
    """The tiny config self-launches 2 gloo processes (CP=2, zigzag); losses match CP=1 step by step (whose loss
    takes the tokens 24 at a time: the chunked output layer changes nothing)."""
    cp2 = _train(tmp_path / "cp2")
    cp1 = _train(tmp_path / "cp1", "--set", "parallel.cp=1", "--set", "loss_chunk_tokens=24", nproc=1)
    assert [r["step"] for r in cp2] == list(range(1, 7))
    for a, b in zip(cp2, cp1):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(b["loss"])), (a, b)
    assert {"step", "loss", "tokens_per_s"} <= set(cp2[0])
    assert (tmp_path / "cp2" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "cp2" / "checkpoint.json").exists() and (tmp_path / "cp2" / "checkpoint-6.pt").exists()


def test_resume_gives_the_same_losses(tmp_path):
    straight = _train(tmp_path / "a", "--set", "parallel.cp=1", nproc=1)
    _train(tmp_path / "b", "--set", "parallel.cp=1", "--set", "stop_at=3", nproc=1)  # "preempted" after step 3
    resumed = _train(tmp_path / "b", "--set", "parallel.cp=1", "--resume", nproc=1)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"], (a, b)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="model.variant must be one of"):
        load_config("tiny", ["model.variant=mamba"])
    with pytest.raises(ValueError, match="data.seq_len = 30 must be a multiple of 4"):
        load_config("tiny", ["data.seq_len=30"])
    with pytest.raises(ValueError, match="no field 'lrr'"):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 0"):
        load_config("tiny", ["loss_chunk_tokens=-5"])
    with pytest.raises(ValueError, match="unknown config"):
        load_config("huge")
    with pytest.raises(ValueError, match="must look like"):
        load_config("tiny", ["optim.lr"])
    with pytest.raises(ValueError, match="max_gpu_memory_gib must be >= 0"):
        load_config("tiny", ["max_gpu_memory_gib=-1"])


def test_gpu_memory_cap_fraction():
    """A 143 GB H200 capped at 79 GiB; a cap above the GPU's size is an error naming the setting."""
    from pdelta_cp.train.loop import gpu_memory_fraction

    total = 143771 * 2**20
    assert gpu_memory_fraction(79, total) == pytest.approx(79 * 1024 / 143771)
    with pytest.raises(ValueError, match="max_gpu_memory_gib = 200 is more than this GPU has"):
        gpu_memory_fraction(200, total)


def test_preprocess_and_train_on_a_corpus(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    subprocess.run([sys.executable, "-m", "pdelta_cp.cli", "preprocess", str(text), "--out", str(tmp_path / "data")],
                   check=True, capture_output=True)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["num_tokens"] == 45 * 200 + 1 and meta["vocab_size"] == 257
    rows = _train(tmp_path / "run", "--set", "data.task=tokens", "--set", f"data.path={tmp_path / 'data'}",
                  "--set", "model.vocab_size=257", "--set", "steps=12")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # a repetitive text is learnt quickly


def test_corpus_config_errors():
    with pytest.raises(ValueError, match="needs data.path"):
        load_config("tiny", ["data.task=tokens"])


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    _train(tmp_path, "--set", "tensorboard=true", "--set", "parallel.cp=1", nproc=1)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
