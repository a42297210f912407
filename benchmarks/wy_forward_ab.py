"""A/B of the WY forward kernels on one GPU: accuracy against float64 and time, then the whole op.

    python benchmarks/wy_forward_ab.py --out wy_ab.json [--T 32768 131072] [--decay scalar|channel]

Stage level (Nc = T/64 chunks, H = HV = 16, K = V = 128): the row-substitution kernel and the 16-row blocked
kernel (PDELTA_WY_BLOCKED=1) with its diagonal blocks by substitution or by doubling products, each at 4 and
8 warps; W, U, P̃, d and the inverse T compared with the PyTorch
form in float64 (relative RMS). --decay channel: PKDA's row kernel at 4 and 8 warps.
Op level, in the same process (bf16 inputs as in bench_kernels.py): PGDN forward+backward with the row forward
(PDELTA_WY_BLOCKED=0) and the blocked default; or PKDA at its default (4 warps) and with the WY forward at 8
(PDELTA_WARPS_WY_CHANNEL_FWD=8). Rows are written to --out as they come.
(Session g, H100: PKDA's blocked WY forward, both WY backwards over key-column blocks and PKDA's output backward
over key-column blocks were measured here and removed: no faster, or slower, and PGDN's failed on the GPU.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import make, rows_writer  # noqa: E402

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.kernels import channel, wy  # noqa: E402
from pdelta_cp.kernels._triton_utils import chunk_tile_config, dot_precision  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

C = 64


def stage_inputs(Nc: int, H: int, K: int, V: int, device: str, seed: int = 0, per_channel: bool = False):
    """Normalised keys, a preconditioned key within ±30% of them, gains in (0, 1), gates of a GDN layer (or of a
    KDA layer: one per key channel)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = F.normalize(torch.randn(Nc, H, C, K, device=device, generator=gen), dim=-1)
    p = k * (0.7 + 0.6 * torch.rand(Nc, H, C, K, device=device, generator=gen))
    v = torch.randn(Nc, H, C, V, device=device, generator=gen)
    beta = torch.rand(Nc, H, C, device=device, generator=gen)
    shape = (Nc, H, C, K) if per_channel else (Nc, H, C)
    gamma = F.logsigmoid(torch.randn(*shape, device=device, generator=gen) + 3).cumsum(2)
    return k, p, v, beta, gamma


def run_kernel(kernel, inputs, warps: int, **extra):
    k, p, v, beta, gamma = inputs
    Nc, H, _, K = k.shape
    V = v.shape[-1]
    BK, BV, _, stages = chunk_tile_config(K, V)
    W, P_t = k.new_empty(Nc, H, C, K), k.new_empty(Nc, H, C, K)
    U, T, d = k.new_empty(Nc, H, C, V), k.new_empty(Nc, H, C, C), k.new_empty(gamma.shape[:2] + gamma.shape[3:])

    def launch():
        kernel[(Nc, H)](k, p, v, beta, gamma, W, U, P_t, T, d, H, H, 1, d, d, K=K, V=V, C=C, BK=BK, BV=BV,
                        PRECISION=dot_precision(), num_warps=warps, num_stages=stages, **extra)
    launch()
    return launch, (W, U, P_t, d), T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--out", default="wy_ab.json")
    ap.add_argument("--op-only", action="store_true", help="skip the stage-level rows")
    ap.add_argument("--decay", choices=["scalar", "channel"], default="scalar",
                    help="scalar: PDN/PGDN's kernels (PDELTA_WY_BLOCKED); channel: PKDA's")
    args = ap.parse_args()
    K = V = 128
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 accuracy check, no timing
    emit = rows_writer(args.out, {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                  "torch": torch.__version__, "command": " ".join(sys.argv)})
    channel_decay = args.decay == "channel"
    if channel_decay:
        kernels = {"row": (channel._wy_ch_fwd_kernel, {})}
        torch_form, op, gate = channel._wy_torch, "pkda", "gk"
        settings = [{}, {"PDELTA_WARPS_WY_CHANNEL_FWD": "8"}]
    else:
        kernels = {"row": (wy._wy_fwd_kernel, {}), "blocked": (wy._wy_fwd_blocked_kernel, {}),
                   "blocked-doubling": (wy._wy_fwd_blocked_kernel, {"DOUBLING": True})}
        torch_form, op, gate = wy._wy_torch, "pgdn", "g"
        settings = [{"PDELTA_WY_BLOCKED": "0"}, {}]
    for T in [] if args.op_only else args.T:
        inputs = stage_inputs(T // C, args.H, K, V, device, per_channel=channel_decay)
        ref = torch_form(*(t.double() for t in inputs))
        for name, (kernel, extra) in kernels.items():
            for warps in (4, 8):
                row = {"level": "stage", "decay": args.decay, "kernel": name, "warps": warps, "T": T, "H": args.H,
                       "K": K, "V": V}
                try:
                    launch, outs, _ = run_kernel(kernel, inputs, warps, **extra)
                    row.update({f"rel_rms_{n}": rel_rms(a, b) for n, a, b in zip("W U P_t d".split(), outs, ref)})
                    row["ms"] = do_bench(launch, warmup=10, rep=50) if device == "cuda" else None
                except Exception as exc:  # a config that does not compile must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                emit(row)
        del inputs, ref
    for T in args.T if device == "cuda" else []:
        x = make(1, T, args.H, K, V)
        do = torch.randn(1, T, args.H, V, device="cuda", dtype=torch.bfloat16)
        fn = lambda: precond_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g_atk"], x["beta_atk"], x[gate],  # noqa
                                        backend="triton")[0]
        for env in settings:  # the switches are read at every call of the stages
            os.environ.update(env)
            fwd = do_bench(fn, warmup=5, rep=30)
            both = do_bench(lambda: fn().backward(do), warmup=5, rep=30)
            emit({"level": "op", "op": op, "env": env, "T": T, "H": args.H, "K": K, "V": V,
                  "fwd_ms": fwd, "fwd_bwd_ms": both})
            for name in env:
                os.environ.pop(name)


if __name__ == "__main__":
    main()
