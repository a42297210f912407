"""The CP demo: the three recurrences split across processes, compared with one process on the whole stream.

Embedded default: one packed stream of 4 sequences (2048 tokens), H=4 key heads, 8 value heads, K=V=32,
float32, run with both CP layouts. Every rank prints nothing; rank 0 prints one line per case with the
relative RMS error of the outputs, final states and all input gradients against the single-process op.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from . import precond_delta_rule
from .cp.layout import shard
from .testing import SEQUENCE_ARGS, call, make_inputs, output_weights, rel_rms, weighted_loss

CU_SEQLENS = [0, 300, 1100, 1111, 2048]


def _case(variant: str, layout: str, dtype) -> dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    T = CU_SEQLENS[-1]
    cu = torch.tensor(CU_SEQLENS)
    inp = make_inputs(B=1, T=T, H=4, HV=8, K=32, V=32, variant=variant, dtype=dtype, num_sequences=len(cu) - 1)
    t0 = time.perf_counter()
    ref = call(precond_delta_rule, inp, cu_seqlens=cu, output_final_state=True)
    weights = output_weights(*ref)
    ref_grads = torch.autograd.grad(weighted_loss(ref, weights), list(inp.values()))
    t1 = time.perf_counter()
    local = {n: (shard(t, world, rank, layout) if n in SEQUENCE_ARGS else t) for n, t in inp.items()}
    out = call(precond_delta_rule, local, cu_seqlens=cu, output_final_state=True, cp_group=dist.group.WORLD,
               cp_layout=layout)
    grads = torch.autograd.grad(weighted_loss(out, [shard(weights[0], world, rank, layout)] + weights[1:]),
                                list(inp.values()))
    t2 = time.perf_counter()
    errors = {"final_S": rel_rms(out[1], ref[1]), "final_A": rel_rms(out[2], ref[2])}
    o_full = torch.zeros_like(ref[0])
    o_full[:, shard(torch.arange(T)[None], world, rank, layout)[0]] = out[0].detach()
    dist.all_reduce(o_full)
    errors["o"] = rel_rms(o_full, ref[0])
    worst_grad = 0.0
    for g, r in zip(grads, ref_grads):
        g = g.clone()
        dist.all_reduce(g)
        worst_grad = max(worst_grad, rel_rms(g, r))
    errors["worst grad"] = worst_grad
    errors["single s"], errors["cp s"] = t1 - t0, t2 - t1
    return errors


def demo_worker(dtype_name: str = "float32") -> None:
    dtype = getattr(torch, dtype_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"pdelta-cp demo: {world} processes ({dist.get_backend()}), stream of {CU_SEQLENS[-1]} tokens in "
              f"{len(CU_SEQLENS) - 1} sequences, {dtype_name}; relative RMS error of CP vs one process")
        print(f"{'variant':8} {'layout':11} {'o':>9} {'final_S':>9} {'final_A':>9} {'worst grad':>10} "
              f"{'1-proc s':>8} {'CP s':>6}")
    worst = 0.0
    for variant in ("pdn", "pgdn", "pkda"):
        for layout in ("contiguous", "zigzag"):
            e = _case(variant, layout, dtype)
            worst = max(worst, e["o"], e["final_S"], e["final_A"], e["worst grad"])
            if rank == 0:
                print(f"{variant:8} {layout:11} {e['o']:9.2e} {e['final_S']:9.2e} {e['final_A']:9.2e} "
                      f"{e['worst grad']:10.2e} {e['single s']:8.2f} {e['cp s']:6.2f}", flush=True)
    if rank == 0:
        limit = 1e-10 if dtype == torch.float64 else 1e-5
        print(f"worst error {worst:.2e} ({'within' if worst < limit else 'ABOVE'} the {limit:g} tolerance)")
        if worst >= limit:
            raise SystemExit(1)
