"""Context-parallel benchmark and check: our state-passing CP vs head all-to-all (Ulysses) vs fla-core KCP.

    torchrun --nproc-per-node 4 benchmarks/bench_cp.py --T 131072 524288 --weak 32768 --out cp.json
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --device cpu --T 512 --H 2 --K 16 --V 16 --dtype float32

Every configuration first checks that our CP output and input gradients equal the same kernels on one
device (relative RMS <= 3e-3 in bf16) — the reference runs on rank 0's device on the whole sequence — and
then times forward+backward: median over steps of the slowest rank. Bytes communicated per layer and rank
are counted from the exchanged summaries. Results are written (rank 0) after every row.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.cp.layout import shard  # noqa: E402
from pdelta_cp.cp.ulysses import ulysses_precond_delta_rule  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402


def inputs(T, H, K, V, variant, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen)

    # Weak decays (~e^-0.007 per token): states live thousands of tokens, so the check sees the hand-off between
    # ranks (with logsigmoid(N(0,1)) gates a state is forgotten within a chunk and any hand-off would pass).
    x = {"q": r(1, T, H, K), "k": r(1, T, H, K), "v": r(1, T, H, V), "beta": torch.rand(1, T, H, generator=gen),
         "g_atk": F.logsigmoid(r(1, T, H) + 5), "beta_atk": torch.rand(1, T, H, generator=gen)}
    x["g"] = {"pdn": None, "pgdn": F.logsigmoid(r(1, T, H) + 5), "pkda": F.logsigmoid(r(1, T, H, K) + 5)}[variant]
    out = {}
    for n, t in x.items():
        if t is not None:
            dt = torch.float32 if n in ("g", "g_atk") else dtype
            out[n] = t.to(device=device, dtype=dt).requires_grad_(True)
    return out


ARGS = ("q", "k", "v", "beta", "g_atk", "beta_atk", "g")


def run_ours(x, group, layout, backend):
    return precond_delta_rule(*[x.get(n) for n in ARGS], cp_group=group, cp_layout=layout, backend=backend)[0]


def run_ours_tree(x, group, layout, backend):
    """Our CP with the PyTorch state exchange (autograd through a tree of dense maps): the pre-kernel path."""
    os.environ["PDELTA_CP_TREE"] = "1"
    try:
        return run_ours(x, group, layout, backend)
    finally:
        os.environ.pop("PDELTA_CP_TREE")


def run_ulysses(x, group, layout, backend):
    return ulysses_precond_delta_rule(*[x.get(n) for n in ARGS], cp_group=group, backend=backend)


def run_fla_kcp(x, group, layout, backend, variant):
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.cp import build_cp_context
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda

    fla_chunk_o.IS_NVIDIA_HOPPER = False  # bypass fla's #640 guard (Triton < 3.7.1 on Hopper): timing only
    W = dist.get_world_size(group)
    T = x["q"].shape[1] * W
    ctx = None if W == 1 else build_cp_context(torch.tensor([0, T], device=x["q"].device, dtype=torch.int32),
                                               group=group, layout=layout)
    if variant == "pkda":
        return chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True, cp_context=ctx)[0]
    return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True,
                                  cp_context=ctx)[0]


def bytes_per_layer(H, K, V, pieces):
    """Summary traffic one rank contributes per layer and pass (fp32): A [H, 2K] and S [H, K, K+V] per piece."""
    return pieces * 4 * (H * 2 * K + H * K * (K + V))


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - t0], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
        times.append(elapsed.item() * 1e3)
    return statistics.median(times)


def profile_step(step, path: str, write: bool, device, warmup: int = 2, active: int = 3) -> None:
    """``active`` more steps under torch.profiler on every rank (the collectives need all), after ``warmup``
    profiled-but-discarded ones, each started in step with the other ranks (barrier + synchronize): profiling a
    single cold step lets the profiler's own start-up skew the ranks, so the collectives show waits that do not
    occur in the timed steps. ``write``: save the table of kernels and ops by device time (CPU time on CPU) per
    step to ``path`` and the rank's timeline (Chrome trace, gzip) next to it."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1)) as prof:
        for i in range(warmup + active):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                walls.append((time.perf_counter() - t0) * 1e3)
            prof.step()
    if write:
        events = prof.key_averages()
        busy_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / active  # kernels only
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(f"step wall {statistics.median(walls):.2f} ms (profiled, median of {active}), "
                    f"device busy {busy_us / 1e3:.2f} ms per step; table totals are over {active} steps\n")
            f.write(events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                 row_limit=60, max_name_column_width=70))
        trace = path.rsplit(".", 1)[0] + ".trace.json"
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            dst.write(src.read())
        os.remove(trace)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[131072], help="global tokens (strong scaling)")
    ap.add_argument("--weak", type=int, nargs="*", default=[], help="tokens per rank (weak scaling)")
    ap.add_argument("--variants", nargs="+", default=["pgdn", "pkda"])
    ap.add_argument("--methods", nargs="+", default=["ours", "ulysses", "fla"])
    ap.add_argument("--layout", default="contiguous")
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check", type=int, default=1, help="check against one device first (0: skip)")
    ap.add_argument("--check-max-T", type=int, default=131072,
                    help="skip the one-device check above this many global tokens (it must fit one device)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a collective may wait before failing")
    ap.add_argument("--out", default="cp.json")
    ap.add_argument("--profile", default="", help="folder: rank 0 writes a torch.profiler table of one step of "
                                                    "every 'ours' row there (where CP's extra time goes)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    # a rank stuck in a collective its peers left (a peer's error) fails after this instead of hanging
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    backend = "triton" if cuda else "torch"
    group = dist.group.WORLD
    rows = []
    shapes = [("strong", T) for T in args.T] + [("weak", t * W) for t in args.weak]
    for kind, T in shapes:
        for variant in args.variants:
            for method in args.methods:
                row = {"method": method, "variant": variant, "scaling": kind, "T_global": T, "ranks": W,
                       "H": args.H, "K": args.K, "V": args.V, "dtype": args.dtype, "device": str(device)}
                try:
                    check = args.check and method != "fla" and T <= args.check_max_T
                    if check:
                        x = inputs(T, args.H, args.K, args.V, variant, device, dtype)
                        local = {n: shard(t.detach(), W, rank, args.layout).requires_grad_(True)
                                 for n, t in x.items()}
                    else:  # no global copy: each rank draws only its own tokens
                        local = inputs(T // W, args.H, args.K, args.V, variant, device, dtype, seed=rank)
                    fn = {"ours": run_ours, "ours-tree": run_ours_tree, "ulysses": run_ulysses}.get(method)
                    if method == "fla":
                        def fn(xx, g, lay, be, v=variant):
                            return run_fla_kcp(xx, g, lay, be, v)
                    do = torch.randn_like(local["v"])

                    def step():
                        fn(local, group, args.layout, backend).backward(do)

                    if check:
                        o = fn(local, group, args.layout, backend)
                        grads = torch.autograd.grad((o * do).sum(), [local[n] for n in ("q", "k", "v")])
                        if W > 1:
                            ref = precond_delta_rule(*[x.get(n) for n in ARGS], backend=backend)[0]
                            do_full = torch.zeros_like(ref)
                            do_full[:, shard(torch.arange(T)[None], W, rank, args.layout)[0]] = do
                            dist.all_reduce(do_full)
                            ref_grads = torch.autograd.grad((ref * do_full).sum(), [x[n] for n in ("q", "k", "v")])
                            err = max([rel_rms(o, shard(ref, W, rank, args.layout))] +
                                      [rel_rms(g, shard(r, W, rank, args.layout)) for g, r in zip(grads, ref_grads)])
                            err_t = torch.tensor([err], device=device)
                            dist.all_reduce(err_t, op=dist.ReduceOp.MAX)
                            row["max_rel_rms_vs_1_device"] = err_t.item()
                        del o, grads, x
                        ref = ref_grads = do_full = None  # free before the peak-memory measurement
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    row["fwd_bwd_ms"] = timed(step, args.steps, args.warmup, device)
                    if cuda:
                        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if args.profile and method == "ours":
                        profile_step(step, os.path.join(args.profile, f"profile_{variant}_{kind}_{T}_{W}.txt"),
                                     rank == 0, device)
                    pieces = 2 if args.layout == "zigzag" else 1
                    if method.startswith("ours"):
                        row["bytes_per_layer_per_rank"] = bytes_per_layer(args.H, args.K, args.V, pieces)
                    elif method == "ulysses":  # q, k, v, o and 3 gates, there and back, 2 bytes each
                        row["bytes_per_layer_per_rank"] = 2 * 2 * (T // W) * args.H * (2 * args.K + 2 * args.V + 3)
                except Exception as exc:  # a failing method must not lose the other rows
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    with open(args.out, "w") as f:
                        json.dump({"rows": rows, "torch": torch.__version__, "command": " ".join(sys.argv),
                                   "gpu": torch.cuda.get_device_name() if cuda else "cpu"}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
