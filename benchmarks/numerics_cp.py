"""Long-context numerics of CP (issue 8): how far CP results drift from one device as ranks and T grow.

    torchrun --nproc-per-node 4 benchmarks/numerics_cp.py --T 65536 262144 1048576 --out numerics.json
    torchrun --nproc-per-node 2 benchmarks/numerics_cp.py --device cpu --dtype float32 --T 512 --H 2 --K 16 --V 16

For each variant and T, every rank computes the single-device answer on the whole sequence (same kernels, same
dtype), then the first w ranks (w = 2, 4, ... up to the world size) run CP on their pieces; the table records
the relative RMS error of the outputs, the final states and every input gradient, reduced over ranks.

Why errors could grow: a rank's entering state is a chain of fp32 affine summaries S ← M S + b, one per earlier
piece; an error e in an entering state leaves the piece as M e. The delta rule's transitions are non-normal
(M = Π (diag(d) − P̃ᵀ W) with P ≠ K under preconditioning), so the study also measures each piece's
amplification ‖M X‖ / ‖X‖ for random X and for X after power iterations (the dominant growth), from
S(X) − S(0) of the op itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_cp import ARGS, inputs  # noqa: E402

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.cp.layout import shard  # noqa: E402


def run(x, w_o, w_S, group=None, layout="contiguous", backend="auto"):
    """(o, final_S, {name: grad}) of the loss Σ o·w_o + Σ final_S·w_S (w_o holds this rank's tokens)."""
    o, S, _ = precond_delta_rule(*[x.get(n) for n in ARGS], cp_group=group, cp_layout=layout, backend=backend,
                                 output_final_state=True)
    names = [n for n in ARGS if x.get(n) is not None]
    grads = torch.autograd.grad((o.float() * w_o).sum() + (S * w_S).sum(), [x[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, grads))


def squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[|a − b|², |b|²] in float64."""
    a, b = a.double(), b.double()
    return torch.stack([(a - b).pow(2).sum(), b.pow(2).sum()])


def amplification(x, piece: slice, power_steps: int) -> tuple[float, float]:
    """‖M X‖/‖X‖ of the piece's state map for a random X, and after ``power_steps`` power iterations.

    M does not depend on v, and with v = 0 the piece's final state from X is exactly M X (no S(X) − S(0)
    cancellation, which would floor the estimate at float32 resolution)."""
    sub = {n: t.detach()[:, piece] for n, t in x.items()}
    sub["v"] = torch.zeros_like(sub["v"])
    H, K, V = sub["v"].shape[2], sub["q"].shape[-1], sub["v"].shape[-1]

    def apply_map(X):
        return precond_delta_rule(*[sub.get(n) for n in ARGS], initial_state=X, output_final_state=True)[1]

    with torch.no_grad():
        X = torch.randn(1, H, K, V, device=sub["v"].device, dtype=torch.float32)
        X = X / X.norm()
        first = None
        for _ in range(power_steps + 1):
            MX = apply_map(X)
            growth = (MX.norm() / X.norm()).item()
            first = growth if first is None else first
            if growth == 0.0:  # the map sends X below float32's range: nothing left to iterate
                break
            X = MX / MX.norm()
    return first, growth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[65536, 262144, 1048576])
    ap.add_argument("--variants", nargs="+", default=["pgdn", "pkda"])
    ap.add_argument("--layout", default="contiguous")
    ap.add_argument("--H", type=int, default=2)  # every rank holds the whole-sequence reference: 1M tokens ≈ 45 GiB
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--power-steps", type=int, default=8)
    ap.add_argument("--out", default="numerics.json")
    args = ap.parse_args()
    backend_kind = "cuda:nccl" if args.device == "cuda" else "cpu:gloo"
    dist.init_process_group(backend_kind.split(":")[1], timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    widths = [w for w in (2 ** i for i in range(1, 11)) if w <= world]
    groups = {w: dist.new_group(list(range(w))) for w in widths}  # every rank takes part in every new_group
    result = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "command": " ".join(sys.argv), "rows": []}
    for variant in args.variants:
        for T in args.T:
            x = inputs(T, args.H, args.K, args.V, variant, device, dtype)
            gen = torch.Generator().manual_seed(7)
            w_o = torch.randn(x["v"].shape, generator=gen).to(device)
            w_S = torch.randn(1, args.H, args.K, args.V, generator=gen).to(device)
            ref_o, ref_S, ref_g = run(x, w_o, w_S)
            for w in widths:
                err = torch.zeros(2 + len(ref_g), 2, dtype=torch.float64, device=device)
                if rank < w:
                    local = {n: shard(t.detach(), w, rank, args.layout).requires_grad_(True) for n, t in x.items()}
                    o, S, g = run(local, shard(w_o, w, rank, args.layout), w_S, groups[w], args.layout)
                    err[0] = squared(o, shard(ref_o, w, rank, args.layout))
                    err[1] = squared(S, ref_S) / w  # replicated on every rank: count once
                    for i, n in enumerate(ref_g):
                        err[2 + i] = squared(g[n], shard(ref_g[n], w, rank, args.layout))
                dist.all_reduce(err)
                rel = (err[:, 0] / err[:, 1].clamp_min(1e-300)).sqrt().tolist()
                row = {"variant": variant, "T": T, "ranks": w, "dtype": args.dtype, "layout": args.layout,
                       "o": rel[0], "final_S": rel[1], **{f"d{n}": r for n, r in zip(ref_g, rel[2:])}}
                row["max_rel_rms"] = max(rel)
                if rank == 0:
                    piece = slice(0, T // w) if args.layout == "contiguous" else slice(0, T // (2 * w))
                    row["piece_amplification_random"], row["piece_amplification_dominant"] = amplification(
                        x, piece, args.power_steps)
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
            del x, w_o, ref_o, ref_S, ref_g
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
