"""Training configuration: nested dataclasses, named presets, and ``section.field=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..cp.layout import LAYOUTS
from ..layers import VARIANTS
from ..model import ModelConfig


@dataclass
class ParallelConfig:
    cp: int = 1  # context-parallel degree; data parallel = world size / cp
    layout: str = "contiguous"  # or "zigzag"
    backend: str = "auto"  # recurrence backend: auto | torch | triton
    nproc: int = 1  # processes to start when not under a launcher
    engine: str = "torch"  # "torch" (AdamW + one gradient all-reduce) or "deepspeed" (its engine, ZeRO over DP x CP)
    zero_stage: int = 1  # DeepSpeed ZeRO stage (0, 1 or 2)


@dataclass
class DataConfig:
    task: str = "mqar"  # "mqar": synthetic multi-query associative recall (embedded default); "tokens": a corpus
    path: str = ""  # folder written by `pdelta-cp preprocess` (task "tokens")
    seq_len: int = 256  # tokens per sample (global, split over CP ranks)
    batch_size: int = 8  # samples per data-parallel rank per step
    num_kv_pairs: int = 8
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_steps: int = 1024
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0


@dataclass
class TrainConfig:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    stop_at: int = 0  # stop (with a checkpoint) after this step, as a preempted job would; 0: run to the end
    skip_nonfinite: bool = True  # skip (and report) a step whose loss or gradients are NaN/Inf; False: raise
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the tensorboard package)
    wandb_project: str = ""  # also log to this Weights & Biases project (needs wandb)
    seed: int = 42
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    loss_chunk_tokens: int = 0  # > 0: output layer + loss this many tokens at a time, logits remade in backward
    max_gpu_memory_gib: float = 0.0  # > 0: cap each GPU's allocations (e.g. 79: does it fit an 80 GB H100?)


    def validate(self) -> None:
        problems = []
        if self.model.variant not in VARIANTS:
            problems.append(f"model.variant must be one of {VARIANTS}, got {self.model.variant!r}")
        if self.parallel.layout not in LAYOUTS:
            problems.append(f"parallel.layout must be one of {LAYOUTS}, got {self.parallel.layout!r}")
        if self.model.attention_every < 0:
            problems.append(f"model.attention_every must be >= 0, got {self.model.attention_every}")
        if self.parallel.engine not in ("torch", "deepspeed"):
            problems.append(f"parallel.engine must be torch or deepspeed, got {self.parallel.engine!r}")
        if self.parallel.zero_stage not in (0, 1, 2):
            problems.append(f"parallel.zero_stage must be 0, 1 or 2, got {self.parallel.zero_stage}")
        if self.parallel.cp < 1:
            problems.append(f"parallel.cp must be >= 1, got {self.parallel.cp}")
        pieces = self.parallel.cp * (2 if self.parallel.layout == "zigzag" else 1)
        if self.data.seq_len % pieces:
            problems.append(f"data.seq_len = {self.data.seq_len} must be a multiple of {pieces} "
                            f"(cp = {self.parallel.cp}, layout {self.parallel.layout})")
        if self.data.task not in ("mqar", "tokens"):
            problems.append(f"data.task must be mqar or tokens, got {self.data.task!r}")
        if self.data.task == "tokens" and not self.data.path:
            problems.append("data.task=tokens needs data.path (a folder written by `pdelta-cp preprocess`)")
        if self.data.task == "mqar" and 4 * self.data.num_kv_pairs > self.data.seq_len:
            problems.append(f"data.seq_len = {self.data.seq_len} is too short for {self.data.num_kv_pairs} "
                            f"key-value pairs and their queries (needs >= {4 * self.data.num_kv_pairs})")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.loss_chunk_tokens < 0:
            problems.append(f"loss_chunk_tokens must be >= 0 (0: all tokens at once), got {self.loss_chunk_tokens}")
        if self.max_gpu_memory_gib < 0:
            problems.append(f"max_gpu_memory_gib must be >= 0 (0: no cap), got {self.max_gpu_memory_gib}")
        if self.steps < 1 or self.log_every < 1:
            problems.append("steps and log_every must be >= 1")
        if problems:
            raise ValueError("invalid training config:\n  " + "\n  ".join(problems))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _tiny() -> TrainConfig:
    return TrainConfig(
        name="tiny",
        model=ModelConfig(vocab_size=64, d_model=128, num_layers=2, num_heads=4, head_dim=32, variant="pgdn"),
        parallel=ParallelConfig(cp=2, layout="zigzag", backend="auto", nproc=2),
        data=DataConfig(seq_len=128, batch_size=16, num_kv_pairs=4),
        optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
        steps=200, log_every=10,
    )


def _paper(name: str, d: int, heads: int, head_dim: int) -> TrainConfig:
    return TrainConfig(
        name=name,
        model=ModelConfig(vocab_size=32000, d_model=d, num_layers=24, num_heads=heads, head_dim=head_dim,
                          variant="pgdn", recompute=True, fp32_residual=False),
        parallel=ParallelConfig(cp=1, layout="zigzag"),
        data=DataConfig(seq_len=2048, batch_size=16, num_kv_pairs=64),
        optim=OptimConfig(lr=4e-4, warmup_steps=1024),
        steps=30000, log_every=10, checkpoint_every=1000, dtype="bfloat16", loss_chunk_tokens=16384,
    )


PRESETS = {"tiny": _tiny, "340m": lambda: _paper("340m", 1024, 8, 128), "1b": lambda: _paper("1b", 1792, 14, 128)}


def _convert(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, tuple):
        return tuple(float(x) for x in text.split(","))
    if current is None:
        return None if text.lower() == "none" else int(text)
    return type(current)(text)


def load_config(name: str, overrides: list[str] = ()) -> TrainConfig:
    """A preset (``tiny``, ``340m``, ``1b``) or a JSON file, then ``section.field=value`` overrides."""
    if name in PRESETS:
        cfg = PRESETS[name]()
    elif name.endswith(".json"):
        with open(name) as f:
            raw = json.load(f)
        cfg = TrainConfig(name=raw.get("name", name), model=ModelConfig(**raw.get("model", {})),
                          parallel=ParallelConfig(**raw.get("parallel", {})), data=DataConfig(**raw.get("data", {})),
                          optim=OptimConfig(**{k: tuple(v) if k == "betas" else v
                                               for k, v in raw.get("optim", {}).items()}),
                          **{k: v for k, v in raw.items() if k not in ("name", "model", "parallel", "data", "optim")})
    else:
        raise ValueError(f"unknown config {name!r}: use one of {sorted(PRESETS)} or a .json file")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. optim.lr=1e-3)")
        path, text = item.split("=", 1)
        target, *parts = path.split(".")
        obj = cfg
        names = [target] + parts
        for n in names[:-1]:
            if not hasattr(obj, n):
                raise ValueError(f"override {item!r}: no config section {n!r}")
            obj = getattr(obj, n)
        if not hasattr(obj, names[-1]):
            raise ValueError(f"override {item!r}: no field {names[-1]!r} in {type(obj).__name__}")
        setattr(obj, names[-1], _convert(text, getattr(obj, names[-1])))
    cfg.validate()
    return cfg
