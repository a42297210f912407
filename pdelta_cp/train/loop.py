"""The training loop: DP x CP process groups, exact global-mean gradients, logging, atomic checkpoints.

Ranks are laid out CP-fastest: rank = dp_rank * cp + cp_rank. Every rank holds its CP share of the samples
of its data-parallel group. Each rank backpropagates (its summed token losses) / (tokens in the global
batch) and the gradients are summed over all ranks in one all-reduce: the result is exactly the gradient of
the global mean loss, whatever the CP and DP degrees (the CP gradient convention of the op is a sum).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from ..cp.comm import all_gather
from ..cp.layout import shard
from ..model import LanguageModel
from . import checkpoint
from .config import TrainConfig
from .data import IGNORE, TokenFile, mqar_batch
from .loss import lm_loss_sums


class ProcessGroups:
    def __init__(self, cp: int):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if self.world % cp:
            raise ValueError(f"parallel.cp = {cp} does not divide the number of processes {self.world}")
        self.cp, self.dp = cp, self.world // cp
        self.cp_rank, self.dp_rank = self.rank % cp, self.rank // cp
        self.cp_group = None
        for d in range(self.dp):  # every rank creates every group, in the same order
            ranks = list(range(d * cp, (d + 1) * cp))
            group = dist.new_group(ranks) if cp < self.world else dist.group.WORLD
            if self.rank in ranks and cp > 1:
                self.cp_group = group


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "conv" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _all_reduce_grads(model: torch.nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def _memory_gb(device: torch.device) -> float:
    """Peak memory in GiB (2**30 bytes; the metrics key is ``mem_gb``): CUDA allocations, else the process RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ProgressBar:
    """One live line on a terminal; one line per update otherwise (logs stay readable)."""

    def __init__(self, total: int):
        self.total, self.start, self.tty = total, time.time(), sys.stdout.isatty()

    def update(self, step: int, text: str) -> None:
        done = step / self.total
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        eta = (time.time() - self.start) / max(done, 1e-9) * (1 - done)
        line = f"step {step:>5}/{self.total} [{bar}] {text} | eta {eta:5.0f}s"
        sys.stdout.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stdout.flush()

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if rows and "accuracy" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color="tab:orange", label="recall acc")
        ax2.set_ylabel("recall accuracy")
        ax2.set_ylim(0, 1)
    ax.set_title("pdelta-cp training")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class MetricSinks:
    """metrics.jsonl always; TensorBoard and Weights & Biases when asked for (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, out_dir: str, active: bool):
        self.tb = self.wandb = None
        if not active:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("tensorboard=true needs the tensorboard package (pip install tensorboard)") from exc
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError("wandb_project needs the wandb package (pip install wandb)") from exc
            self.wandb = wandb.init(project=cfg.wandb_project, config=json.loads(cfg.to_json()), dir=out_dir)

    def log(self, row: dict) -> None:
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fault_injection(step: int, rank: int) -> str | None:
    """Test hooks (environment): PDELTA_FAULT_STEP/PDELTA_FAULT_RANK kill that rank at that step on the first
    attempt (a rank failure); PDELTA_NAN_STEP/PDELTA_FAULT_RANK poison that rank's loss with NaN."""
    env = os.environ
    if str(rank) != env.get("PDELTA_FAULT_RANK", "-1"):
        return None
    if env.get("PDELTA_FAULT_STEP") == str(step) and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return "kill"
    if env.get("PDELTA_NAN_STEP") == str(step):
        return "nan"
    return None


def _first_nonfinite(model: torch.nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def _resume(out_dir: str, model, optimizer, scheduler, device, metrics_path: str, is_main: bool) -> int:
    """Load the newest good checkpoint (if any) and cut metrics.jsonl back to its step; returns that step."""
    state = checkpoint.load_latest(out_dir, map_location=device)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = state["step"]
    if is_main and os.path.exists(metrics_path):
        rows = [line for line in open(metrics_path) if json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(rows)
    return step


def _resume_deepspeed(engine, out_dir: str, metrics_path: str, is_main: bool) -> int:
    folder = os.path.join(out_dir, "deepspeed")
    if not os.path.exists(os.path.join(folder, "latest")):
        return 0
    _, client = engine.load_checkpoint(folder)
    step = int(client["step"])
    if is_main and os.path.exists(metrics_path):
        rows = [line for line in open(metrics_path) if json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(rows)
    return step


def gpu_memory_fraction(cap_gib: float, total_bytes: int) -> float:
    """The allocator fraction that caps one GPU at ``cap_gib`` GiB (a larger GPU standing in for a smaller one)."""
    if cap_gib * 2**30 > total_bytes:
        raise ValueError(f"max_gpu_memory_gib = {cap_gib} is more than this GPU has ({total_bytes / 2**30:.1f} GiB); "
                         "lower it or set 0 for no cap")
    return cap_gib * 2**30 / total_bytes


def train_worker(cfg: TrainConfig, out_dir: str, resume: bool = False) -> None:
    groups = ProcessGroups(cfg.parallel.cp)
    corpus = None
    if cfg.data.task == "tokens":
        corpus = TokenFile(cfg.data.path)
        if corpus.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"the corpus uses {corpus.vocab_size} token ids but model.vocab_size is "
                             f"{cfg.model.vocab_size}; set --set model.vocab_size={corpus.vocab_size}")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    is_main = groups.rank == 0
    if cfg.max_gpu_memory_gib and device.type == "cuda":  # an out-of-memory error past the cap, as on that GPU
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction(cfg.max_gpu_memory_gib, total), device)
    elif cfg.max_gpu_memory_gib and is_main:
        print(f"max_gpu_memory_gib = {cfg.max_gpu_memory_gib} ignored: no GPU", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = LanguageModel(cfg.model).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    engine = None
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import initialize

        engine = initialize(model, optimizer, scheduler, cfg)
        start = _resume_deepspeed(engine, out_dir, metrics_path, is_main) if resume else 0
    else:
        start = _resume(out_dir, model, optimizer, scheduler, device, metrics_path, is_main) if resume else 0
    if groups.world > 1:
        dist.barrier()  # rank 0 has trimmed the metrics before anyone logs
    if is_main:
        if not resume:
            open(metrics_path, "w").close()
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
        print(f"pdelta-cp train: config {cfg.name}, {cfg.model.variant.upper()}, "
              f"{model.num_parameters() / 1e6:.2f}M parameters, {groups.world} process(es) = DP {groups.dp} x CP "
              f"{groups.cp} ({cfg.parallel.layout}), {device.type}, from step {start}", flush=True)
    cp_kwargs = dict(cp_group=groups.cp_group, cp_layout=cfg.parallel.layout, backend=cfg.parallel.backend)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    bar = ProgressBar(cfg.steps) if is_main else None
    sinks = MetricSinks(cfg, out_dir, is_main)
    tokens_per_step = groups.dp * cfg.data.batch_size * cfg.data.seq_len
    window = time.time()
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps

    def state(step: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "config": cfg.to_json()}

    for step in range(start, last):
        fault = _fault_injection(step, groups.rank)
        if fault == "kill":
            print(f"rank {groups.rank}: injected failure at step {step}", flush=True)
            os._exit(13)
        if corpus is not None:
            tokens, labels = corpus.batch(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                          seed=cfg.data.seed, step=step, dp_rank=groups.dp_rank)
        else:
            tokens, labels = mqar_batch(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len,
                                        batch_size=cfg.data.batch_size, num_kv_pairs=cfg.data.num_kv_pairs,
                                        seed=cfg.data.seed, step=step, dp_rank=groups.dp_rank)
        tokens = shard(tokens, groups.cp, groups.cp_rank, cfg.parallel.layout).to(device)
        labels = shard(labels, groups.cp, groups.cp_rank, cfg.parallel.layout).to(device)
        with autocast:
            hidden = (engine or model)(tokens, return_hidden=True, **cp_kwargs)
            loss_sum, scored, correct = lm_loss_sums(hidden.reshape(-1, hidden.shape[-1]), model.embed.weight,
                                                     labels.reshape(-1), ignore_index=IGNORE,
                                                     chunk_tokens=cfg.loss_chunk_tokens)
        if step == start and device.type == "cuda":
            forward_peak = _memory_gb(device)  # reported with the backward's peak after the first step
        if fault == "nan":
            loss_sum = loss_sum * float("nan")
        stats = torch.stack([loss_sum.detach(), scored, correct])
        if groups.world > 1:
            dist.all_reduce(stats)
        loss = loss_sum / stats[1].clamp(min=1)
        if engine is not None:  # DeepSpeed averages over all ranks: scale so that the average is the sum
            engine.backward(loss * groups.world)
        else:
            loss.backward()
        if step == start and device.type == "cuda" and is_main:  # where memory goes, for long-context sizing
            print(f"memory after the first step: forward peak {forward_peak:.2f} GiB, "
                  f"forward + backward peak {_memory_gb(device):.2f} GiB", flush=True)
        # which ranks produced a non-finite loss (the origin) or hold non-finite gradients (CP spreads them)
        loss_ok = bool(torch.isfinite(loss_sum))
        bad_param = None if engine is not None else _first_nonfinite(model)
        code = torch.tensor([(0.0 if loss_ok else 2.0) + (0.0 if bad_param is None else 1.0)], device=device)
        codes = all_gather(code, dist.group.WORLD if groups.world > 1 else None).flatten().tolist()
        done = step + 1
        if any(codes):
            if code.item():
                print(f"rank {groups.rank}: non-finite {'loss' if not loss_ok else 'gradient'} at step {done}"
                      + (f", first parameter affected: {bad_param}" if bad_param else ""), flush=True)
            origin = [r for r, c in enumerate(codes) if c >= 2]
            spread = [r for r, c in enumerate(codes) if c % 2 == 1]
            report = f"non-finite loss on rank(s) {origin}; non-finite gradients on rank(s) {spread}"
            if not cfg.skip_nonfinite:
                raise FloatingPointError(f"step {done}: {report}")
            if is_main:
                print(f"step {done} skipped: {report}", flush=True)
            if engine is not None:
                raise FloatingPointError(f"step {done}: {report} (the DeepSpeed engine cannot skip a step)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            continue
        if engine is not None:
            engine.step()  # clipping, optimizer, scheduler, zero_grad
            grad_norm = engine.get_global_grad_norm() or 0.0
        else:
            _all_reduce_grads(model, groups.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.time()
            steps_in_window = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            row = {"step": done, "loss": stats[0].item() / max(stats[1].item(), 1),
                   "accuracy": stats[2].item() / max(stats[1].item(), 1),
                   "tokens_per_s": tokens_per_step * steps_in_window / max(now - window, 1e-9),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "mem_gb": _memory_gb(device)}
            window = now
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                sinks.log(row)
                bar.update(done, f"loss {row['loss']:.3f} acc {row['accuracy']:.2f} | "
                                 f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | mem {row['mem_gb']:.2f} GiB")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < last:
            if engine is not None:  # every rank writes its ZeRO partition
                engine.save_checkpoint(os.path.join(out_dir, "deepspeed"), tag=f"step{done}",
                                       client_state={"step": done})
            elif is_main:
                checkpoint.save(out_dir, state(done), done)
    if engine is not None:
        engine.save_checkpoint(os.path.join(out_dir, "deepspeed"), tag=f"step{last}", client_state={"step": last})
    if is_main:
        bar.close()
        sinks.close()
        path = (os.path.join(out_dir, "deepspeed") if engine is not None
                else checkpoint.save(out_dir, state(last), last))
        plot_losses(metrics_path, os.path.join(out_dir, "loss.png"))
        print(f"wrote {metrics_path}, {os.path.join(out_dir, 'loss.png')} and {path}", flush=True)
    if groups.world > 1:
        dist.barrier()
