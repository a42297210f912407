"""Launch-switch sweep of the chunk kernels on one GPU: each kernel family at 4 and 8 warps, one at a time, or any
list of environment settings (num_stages, or several switches at once).

    python benchmarks/warps_sweep.py --out warps.json [--variants pgdn pkda] [--T 32768] [--warps 4 8]
    python benchmarks/warps_sweep.py --out sweep.json --settings PDELTA_STAGES_STATE_FWD=2 \
        "PDELTA_STAGES_STATE_FWD=2,PDELTA_WARPS_STATE_FWD=8"

For every kernel family (PDELTA_WARPS_<KERNEL>, kernels/_triton_utils.py `launch_config`) and warp count, or every
--settings entry (comma-separated VAR=VALUE pairs; run one entry per process when a setting may crash: an illegal
memory access poisons the process's CUDA context for every later trial):
  * a miscompile check — the op's output and every input gradient (T = 4096, H = 4, K = V = 128, float32 inputs)
    against the same op at the default warps: the math is identical, so anything above 1e-3 relative RMS is a
    miscompile (Triton 3.6 on Hopper has some), and the row says so;
  * PGDN/PKDA forward+backward time (B = 1, H = 16, K = V = 128, bf16, as bench_kernels.py) against the default,
    timed in the same process (the default is re-timed at the end to show drift).
Rows go to --out as they come. The WY forward of PDN/PGDN launches at 4 warps by default, the rest at the tile
config's (8 for K = 128).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import environment, make, rows_writer  # noqa: E402

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.kernels._triton_utils import WARPS_SWITCHES as KERNELS  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

GATE = {"pdn": None, "pgdn": "g", "pkda": "gk"}


def run_op(variant: str, x: dict):
    g = x[GATE[variant]] if GATE[variant] else None
    return precond_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g_atk"], x["beta_atk"], g, backend="triton")[0]


def outputs_and_grads(variant: str, x: dict, do: torch.Tensor) -> list[torch.Tensor]:
    for t in x.values():
        t.grad = None
    o = run_op(variant, x)
    o.backward(do)
    return [o.detach().clone()] + [t.grad.clone() for t in x.values() if t.grad is not None]


def time_op(variant: str, x: dict, do: torch.Tensor, rep_ms: int = 25) -> float:
    """Median fwd+bwd in ms over about ``rep_ms`` of repetitions (do_bench's rep is a time, not a count)."""
    return do_bench(lambda: run_op(variant, x).backward(do), warmup=5, rep=rep_ms)


def peak_gib(variant: str, x: dict, do: torch.Tensor) -> float:
    """GPU memory peak of one fwd+bwd above what was allocated before it (inputs, their grads), in GiB: the memory
    switches (PDELTA_KEEP_KEYS, PDELTA_REMAKE_WY_BF16, PDELTA_ADJOINTS_BF16) are judged by it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_op(variant, x).backward(do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["pgdn", "pkda"], choices=sorted(KERNELS))
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16, help="heads of the timed op (B = 1, K = V = 128, bf16)")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--kernels", nargs="*", default=None, help="only these kernel families")
    ap.add_argument("--settings", nargs="*", default=None, help="VAR=VALUE[,VAR=VALUE] entries instead of warps")
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest relative RMS difference from the default that is not a miscompile (raise it for "
                         "settings that round differently, e.g. PDELTA_BF16_WS=1)")
    ap.add_argument("--rep-ms", type=int, default=25, help="timing window per trial in ms (at 128K one fwd+bwd "
                    "takes ~80 ms: give 400 or more for several repetitions)")
    ap.add_argument("--out", default="warps.json")
    args = ap.parse_args()
    emit = rows_writer(args.out, environment())  # GPU, torch, Triton, Python, fla, PDELTA_* switches, command

    for variant in args.variants:
        check_x = make(1, 4096, 4, 128, 128, dtype=torch.float32, seed=1)
        check_do = torch.randn(1, 4096, 4, 128, device="cuda")
        time_x = make(1, args.T, args.H, 128, 128)
        time_do = torch.randn(1, args.T, args.H, 128, device="cuda", dtype=torch.bfloat16)
        reference = outputs_and_grads(variant, check_x, check_do)
        base = time_op(variant, time_x, time_do, args.rep_ms)
        emit({"variant": variant, "kernel": "default", "T": args.T, "H": args.H, "fwd_bwd_ms": base,
              "peak_gib": peak_gib(variant, time_x, time_do)})
        trials = [dict(kv.split("=", 1) for kv in entry.split(",")) for entry in args.settings or []]
        if args.settings is None:
            trials = [{f"PDELTA_WARPS_{kernel.upper()}": str(warps)} for kernel in KERNELS[variant]
                      if not args.kernels or kernel in args.kernels for warps in args.warps]
        for env in trials:
            row = {"variant": variant, "settings": env, "T": args.T, "H": args.H}
            os.environ.update(env)
            try:
                got = outputs_and_grads(variant, check_x, check_do)
                row["max_rel_diff_vs_default"] = max(rel_rms(a, b) for a, b in zip(got, reference))
                row["miscompiled"] = row["max_rel_diff_vs_default"] > args.tolerance
                if not row["miscompiled"]:
                    row["fwd_bwd_ms"] = time_op(variant, time_x, time_do, args.rep_ms)
                    row["vs_default"] = row["fwd_bwd_ms"] / base
                    row["peak_gib"] = peak_gib(variant, time_x, time_do)
            except Exception as exc:  # a config that does not compile or fit must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                for var in env:
                    os.environ.pop(var)
            emit(row)
        emit({"variant": variant, "kernel": "default (again)", "T": args.T,
              "fwd_bwd_ms": time_op(variant, time_x, time_do, args.rep_ms)})
        del check_x, check_do, time_x, time_do, reference


if __name__ == "__main__":
    main()
