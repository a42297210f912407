"""Cost model of state-passing context parallelism, fitted to measurements and projected to many GPUs.

    python benchmarks/cost_model.py --cp docs/benchmarks/cp.json --out docs/benchmarks/cost_model.md \
        [--kernels a bench_kernels.py JSON of the same machine kind]

One layer's forward+backward on W ranks with T tokens in total:

    t(W, T) = k(T/W)                     the single-GPU kernels on T/W tokens (fitted: a + b·(T/W))
            + s(T/W)                     the exporting piece's summary (fitted: a fraction of k)
            + 2 · [g(A, W) + g(S, W)]    all-gathers of the preconditioner and state summaries (fwd, bwd)
            + f(W)                       folds (W small matrix products, negligible)
    g(bytes, W) = λ · ⌈log2 W⌉ + bytes · (W − 1) / β      latency λ, bandwidth β per GPU of the link

Two levels (nodes of G GPUs): gather inside each node, compose its G summaries into one, gather the node
summaries across nodes: the inter-node link carries W/G summaries instead of W, and only ⌈log2(W/G)⌉
latency terms. The model prints where that starts to pay off.
"""
from __future__ import annotations

import argparse
import json
import math

LINKS = {  # (latency s, bandwidth bytes/s per GPU) — defaults, override with measurements
    "nvlink": (8e-6, 300e9),
    "infiniband": (20e-6, 40e9),
}


def summary_bytes(H: int, K: int, V: int, pieces: int = 1) -> tuple[int, int]:
    """(A summary, S summary) bytes one rank contributes per pass (fp32)."""
    return pieces * 4 * H * 2 * K, pieces * 4 * H * K * (K + V)


def allgather_time(nbytes: float, world: int, link: tuple[float, float]) -> float:
    latency, bandwidth = link
    if world <= 1:
        return 0.0
    return latency * math.ceil(math.log2(world)) + nbytes * (world - 1) / bandwidth


def fit_kernel(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of t = a + b·T over (tokens, seconds) points; one point gives a = 0."""
    if len(points) == 1:
        T, t = points[0]
        return 0.0, t / T
    n = len(points)
    mx = sum(T for T, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((T - mx) * (t - my) for T, t in points) / max(sum((T - mx) ** 2 for T, _ in points), 1e-30)
    return max(0.0, my - b * mx), b


def fit_summary_frac(measured: list[tuple[int, int, float]], kernel: tuple[float, float], H: int, K: int, V: int,
                     intra: tuple[float, float]) -> float:
    """The summary share (0..1) that best explains measured multi-rank times [(T, W, seconds)], by relative
    least squares over a fine grid (one parameter: no closed form needed)."""
    def loss(frac: float) -> float:
        return sum((step_time(T, W, kernel, H, K, V, summary_frac=frac, intra=intra) / t - 1) ** 2
                   for T, W, t in measured)
    return min((i / 1000 for i in range(1001)), key=loss)


def step_time(T: int, W: int, kernel: tuple[float, float], H: int, K: int, V: int, *, summary_frac: float,
              intra: tuple[float, float], inter: tuple[float, float] | None = None, gpus_per_node: int = 8,
              two_level: bool = False) -> float:
    a, b = kernel
    local = T / W
    t = a + b * local * (1 + (summary_frac if W > 1 else 0.0))
    A_bytes, S_bytes = summary_bytes(H, K, V)
    if W <= gpus_per_node or inter is None:
        comm = allgather_time(A_bytes, W, intra) + allgather_time(S_bytes, W, intra)
    elif two_level:
        nodes = W // gpus_per_node
        comm = (allgather_time(A_bytes, gpus_per_node, intra) + allgather_time(S_bytes, gpus_per_node, intra)
                + allgather_time(A_bytes, nodes, inter) + allgather_time(S_bytes, nodes, inter))
    else:  # one flat all-gather over all ranks, bound by the slower link
        comm = allgather_time(A_bytes, W, inter) + allgather_time(S_bytes, W, inter)
    return t + 2 * comm


def latest_session(rows: list[dict]) -> list[dict]:
    """Rows of the newest session when rows carry a ``session`` tag: older rows timed older code."""
    tags = {r["session"] for r in rows if "session" in r}
    return [r for r in rows if r.get("session") == max(tags)] if tags else rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", help="bench_kernels.py JSON (our op's fwd+bwd at several T)")
    ap.add_argument("--cp", help="bench_cp.py JSON (measured CP runs) to compare against")
    ap.add_argument("--variant", default="pgdn")
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--summary-frac", type=float, default=None,
                    help="summary cost / kernel cost per token (default: fitted to the multi-rank CP rows, else 0.25)")
    ap.add_argument("--out", default="cost_model.md")
    args = ap.parse_args()
    points = []
    if args.kernels:
        data = json.load(open(args.kernels))
        rows = data.get("results") or [r for run in data.get("runs", {}).values() for r in run.get("results", [])]
        points = [(r["B"] * r["T"], r["fwd_bwd_ms"] / 1e3) for r in rows
                  if r.get("op") == args.variant and "fwd_bwd_ms" in r]
    ours = [r for r in latest_session(json.load(open(args.cp))["rows"]) if r.get("method") == "ours"
            and r.get("variant") == args.variant and "fwd_bwd_ms" in r] if args.cp else []
    points += [(r["T_global"], r["fwd_bwd_ms"] / 1e3) for r in ours if r.get("ranks") == 1]  # kernel timings too
    kernel = fit_kernel(points) if points else (0.0, 1 / 3e6)  # placeholder: 3 Mtok/s until measured
    multi = [(r["T_global"], r["ranks"], r["fwd_bwd_ms"] / 1e3) for r in ours if r.get("ranks", 1) > 1]
    fitted = args.summary_frac is None and bool(multi) and bool(points)
    if args.summary_frac is None:
        args.summary_frac = fit_summary_frac(multi, kernel, args.H, args.K, args.V, LINKS["nvlink"]) if fitted else 0.25
    lines = [f"# CP cost model ({args.variant}, H={args.H}, K={args.K}, V={args.V})", "",
             f"Kernel fit: t = {kernel[0] * 1e3:.3f} ms + {kernel[1] * 1e9:.3f} ns/token "
             f"({'fitted to ' + str(len(points)) + ' measurements' if points else 'PLACEHOLDER, not measured'}); "
             f"summary overhead {args.summary_frac:.1%} of the kernel "
             f"({'fitted to the multi-rank rows' if fitted else 'assumed'}); "
             f"links: {LINKS}.", ""]
    if args.cp:
        rows = ours
        lines += ["| measured | ranks | T | measured ms | model ms |", "|---|---|---|---|---|"]
        for r in rows:
            model = step_time(r["T_global"], r["ranks"], kernel, args.H, args.K, args.V,
                              summary_frac=args.summary_frac, intra=LINKS["nvlink"]) * 1e3
            lines.append(f"| | {r['ranks']} | {r['T_global']} | {r['fwd_bwd_ms']:.2f} | {model:.2f} |")
        lines.append("")
    lines += ["| GPUs | T | flat ms | two-level ms | efficiency (flat) | two-level pays off |",
              "|---|---|---|---|---|---|"]
    for T in (2 ** 20, 2 ** 22, 2 ** 24):
        one = step_time(T, 1, kernel, args.H, args.K, args.V, summary_frac=args.summary_frac, intra=LINKS["nvlink"])
        for W in (8, 16, 32, 64, 128, 256, 512):
            flat = step_time(T, W, kernel, args.H, args.K, args.V, summary_frac=args.summary_frac,
                             intra=LINKS["nvlink"], inter=LINKS["infiniband"])
            two = step_time(T, W, kernel, args.H, args.K, args.V, summary_frac=args.summary_frac,
                            intra=LINKS["nvlink"], inter=LINKS["infiniband"], two_level=True)
            lines.append(f"| {W} | {T} | {flat * 1e3:.2f} | {two * 1e3:.2f} | {one / (W * flat):.0%} | "
                         f"{'yes' if two < flat else 'no'} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
