"""Single-GPU kernel benchmark: pdelta-cp (backend="triton") vs fla-core 0.6.0, side by side in one run.

    python benchmarks/bench_kernels.py --out docs/benchmarks/kernels.json [--T 8192 32768 131072] [--batch-case]

Inputs as in docs/benchmarks (anchors): H=16, K=V=128, bf16, q/k/v ~ N(0,1), g = logsigmoid(N(0,1)),
beta ~ U(0,1), g_atk = logsigmoid(N(3,1)), beta_atk ~ U(0,1); every floating input requires grad.
Timing: triton.testing.do_bench median; fwd+bwd = forward + backward of <o, do>. Peak memory: the
allocator's peak during one fwd+bwd, inputs included. fla's gated backward is refused on Hopper with
Triton < 3.7.1 (FLA #640); the guard is bypassed for timing only (its gradients are not checked here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

OURS = ("pdn", "pgdn", "pkda")
FLA = ("fla-gdn", "fla-pgdn", "fla-kda", "fla-pkda")


def make(B, T, H, K, V, device="cuda", dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    x = {
        "q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V),
        "g": F.logsigmoid(torch.randn(B, T, H)), "gk": F.logsigmoid(torch.randn(B, T, H, K)),
        "beta": torch.rand(B, T, H), "g_atk": F.logsigmoid(torch.randn(B, T, H) + 3), "beta_atk": torch.rand(B, T, H),
    }
    out = {}
    for n, t in x.items():
        dt = torch.float32 if n in ("g", "gk", "g_atk") else dtype
        out[n] = t.to(device=device, dtype=dt).requires_grad_(True)
    return out


def op_fn(name, x):
    """A zero-argument callable returning the output tensor o."""
    if name in OURS:
        from pdelta_cp import precond_delta_rule

        g = {"pdn": None, "pgdn": x["g"], "pkda": x["gk"]}[name]
        return lambda: precond_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g_atk"], x["beta_atk"], g,
                                          backend="triton")[0]
    import fla.ops.common.chunk_o as fla_chunk_o

    fla_chunk_o.IS_NVIDIA_HOPPER = False  # bypass the #640 guard: timing only
    if name == "fla-gdn":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return lambda: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                              use_qk_l2norm_in_kernel=True)[0]
    if name == "fla-kda":
        from fla.ops.kda import chunk_kda

        return lambda: chunk_kda(x["q"], x["k"], x["v"], x["gk"], x["beta"], use_qk_l2norm_in_kernel=True)[0]
    if name == "fla-pgdn":
        from fla.ops.precond_gated_delta_rule import chunk_precond_gated_delta_rule

        return lambda: chunk_precond_gated_delta_rule(x["q"], x["k"], x["v"], x["g_atk"], x["g"], x["beta_atk"],
                                                      x["beta"], use_qk_l2norm_in_kernel=True)[0]
    if name == "fla-pkda":
        from fla.ops.precond_kda import chunk_precond_kda

        return lambda: chunk_precond_kda(x["q"], x["k"], x["v"], x["gk"], x["g_atk"], x["beta_atk"], x["beta"],
                                         use_qk_l2norm_in_kernel=True)[0]
    raise ValueError(name)


def measure(name, B, T, H, K, V, warmup, rep):
    torch.cuda.empty_cache()
    x = make(B, T, H, K, V)
    fn = op_fn(name, x)
    leaves = list(x.values())
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        fn().backward(do)

    fwd_bwd()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    fwd_ms = do_bench(fwd, warmup=warmup, rep=rep, quantiles=[0.5])
    fb_ms = do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=leaves, quantiles=[0.5])
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    fwd_ms = fwd_ms[0] if isinstance(fwd_ms, (list, tuple)) else fwd_ms
    fb_ms = fb_ms[0] if isinstance(fb_ms, (list, tuple)) else fb_ms
    return {"op": name, "B": B, "T": T, "H": H, "K": K, "V": V, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
            "mtok_per_s_fwd_bwd": B * T / fb_ms / 1e3, "peak_gib": peak}


def rows_writer(path: str, meta: dict):
    """emit(row): print the row as JSON and rewrite ``path`` ({**meta, "rows": [...]}) with every row so far, so a
    run cut by a time limit keeps what it measured."""
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    return emit


def environment():
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PDELTA_")}}
    try:
        import fla

        info["fla-core"] = getattr(fla, "__version__", "?")
    except ImportError:
        info["fla-core"] = None
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batch-case", action="store_true", help="also B=8, T=4096")
    ap.add_argument("--ops", nargs="+", default=list(OURS + FLA))
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rep", type=int, default=300)
    ap.add_argument("--out", default="kernels.json")
    args = ap.parse_args()
    shapes = [(1, T) for T in args.T] + ([(8, 4096)] if args.batch_case else [])
    result = {"environment": environment(), "results": []}
    for B, T in shapes:
        for name in args.ops:
            try:
                r = measure(name, B, T, args.H, args.K, args.V, args.warmup, args.rep)
            except Exception as exc:  # a failing peer must not lose the other rows
                r = {"op": name, "B": B, "T": T, "error": f"{type(exc).__name__}: {exc}"[:300]}
            result["results"].append(r)
            print(json.dumps(r), flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
