"""Plots of the committed benchmark JSON: CP strong scaling (cp.json) and kernel times (kernels.json).

    python benchmarks/plot_results.py --cp docs/benchmarks/cp.json --kernels docs/benchmarks/kernels.json \
        --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _first_rows(rows: list[dict], key) -> list[dict]:
    """The first measurement of each point (later calls repeat some)."""
    seen, out = set(), []
    for r in rows:
        if "fwd_bwd_ms" in r and key(r) not in seen:
            seen.add(key(r))
            out.append(r)
    return out


def _cp_point(r: dict) -> tuple:
    return r["method"], r["variant"], r["scaling"], r["T_global"], r["ranks"]


def _peer_name(method: str, variant: str) -> str:
    """fla's CP rows time the un-preconditioned op (fla has no CP for the preconditioned ones)."""
    return f"fla KCP ({variant[1:].upper()})" if method == "fla" else method


def plot_cp(path: str, out: str) -> None:
    """Strong scaling, one panel per variant: colour = method, line style = T; dotted = ideal from our 1 GPU."""
    rows = [r for r in _first_rows(json.load(open(path))["rows"], _cp_point) if r["scaling"] == "strong"]
    variants = sorted({r["variant"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    sizes = sorted({r["T_global"] for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = dict(zip(sizes, ["-", "--", "-.", ":"] * 4))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4.5), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for method in methods:
            for T in sizes:
                pts = sorted((r["ranks"], r["fwd_bwd_ms"]) for r in rows
                             if (r["method"], r["variant"], r["T_global"]) == (method, variant, T))
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colours[method], linestyle=styles[T],
                            label=f"{_peer_name(method, variant)} T={T // 1024}K")
                if method == "ours" and pts and pts[0][0] == 1:
                    xs = sorted({r["ranks"] for r in rows})
                    ax.plot(xs, [pts[0][1] / x for x in xs], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("fwd+bwd ms (slowest rank, median)")
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{variant}: one layer, H=16, K=V=128, bf16 (grey: ideal)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cp_scaling.png"), dpi=120)


def plot_kernels(path: str, out: str) -> None:
    rows = [r for r in json.load(open(path))["results"] if "fwd_bwd_ms" in r]
    labels = [f"{r['op']}\nB={r['B']} T={r['T'] // 1024}K" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["fwd_bwd_ms"] for r in rows], label="fwd+bwd")
    ax.bar(range(len(rows)), [r["fwd_ms"] for r in rows], label="fwd")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kernels.png"), dpi=120)


def plot_numerics(path: str, out: str) -> None:
    rows = json.load(open(path))["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in rows}):
        for w in sorted({r["ranks"] for r in rows}):
            pts = sorted((r["T"], r["max_rel_rms"]) for r in rows if (r["variant"], r["ranks"]) == (variant, w))
            ax.plot(*zip(*pts), marker="o", label=f"{variant} CP={w}")
    ax.axhline(3e-3, color="grey", linestyle="--", label="3e-3 limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens, global)")
    ax.set_ylabel("max relative RMS vs one device")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "numerics.png"), dpi=120)


def kernel_table(path: str) -> str:
    """Markdown: every op and shape, with the ratio to fla's GDN at the same shape (same run)."""
    data = json.load(open(path))
    rows = _first_rows(data["results"], lambda r: (r["op"], r["B"], r["T"]))
    gdn = {(r["B"], r["T"]): r["fwd_bwd_ms"] for r in rows if r["op"] == "fla-gdn"}
    lines = ["| op | B × T | fwd ms | fwd+bwd ms | peak GiB | vs fla GDN |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["B"] * r["T"], r["B"], r["op"])):
        base = gdn.get((r["B"], r["T"]))
        rel = f"{r['fwd_bwd_ms'] / base:.2f}×" if base else "—"
        lines.append(f"| {r['op']} | {r['B']} × {r['T'] // 1024}K | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                     f"{r['peak_gib']:.2f} | {rel} |")
    return "\n".join(lines)


def cp_table(path: str) -> str:
    """Markdown: every CP row with its speed-up (strong) or efficiency (weak) against our one-GPU run."""
    rows = _first_rows(json.load(open(path))["rows"], _cp_point)

    def per_gpu_key(r):  # strong scaling compares equal totals, weak scaling equal tokens per GPU
        return r["variant"], r["T_global"] // r["ranks"] if r["scaling"] == "weak" else r["T_global"]

    one = {per_gpu_key(r): r["fwd_bwd_ms"] for r in rows if r["method"] == "ours" and r["ranks"] == 1}
    lines = ["| method | variant | scaling | T global | GPUs | fwd+bwd ms | vs 1 GPU | peak GiB/GPU "
             "| bytes/layer/rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["scaling"], r["variant"], r["T_global"], r["ranks"], r["method"])):
        peer = r["method"] == "fla"  # fla's KCP runs the un-preconditioned op: no ratio to our one-GPU run
        base = None if peer else one.get(per_gpu_key(r))
        variant = {"pgdn": "gdn", "pkda": "kda"}.get(r["variant"], r["variant"]) if peer else r["variant"]
        rel = "—" if base is None else (f"{base / r['fwd_bwd_ms']:.0%} eff." if r["scaling"] == "weak"
                                         else f"{base / r['fwd_bwd_ms']:.2f}×")
        traffic = "—" if r["ranks"] == 1 or "bytes_per_layer_per_rank" not in r else \
            f"{r['bytes_per_layer_per_rank'] / 1e6:.1f} MB"
        lines.append(f"| {r['method']} | {variant} | {r['scaling']} | {r['T_global'] // 1024}K | {r['ranks']} | "
                     f"{r['fwd_bwd_ms']:.1f} | {rel} | {r['peak_gib']:.1f} | {traffic} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp")
    ap.add_argument("--kernels")
    ap.add_argument("--numerics")
    ap.add_argument("--tables", action="store_true", help="also write OUT/tables.md from --kernels and --cp")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if args.cp:
        plot_cp(args.cp, args.out)
    if args.kernels:
        plot_kernels(args.kernels, args.out)
    if args.numerics:
        plot_numerics(args.numerics, args.out)
    if args.tables:
        parts = ["# Benchmark tables (generated by `benchmarks/plot_results.py --tables`; medians)", ""]
        if args.kernels:
            parts += [f"## Kernels ({os.path.basename(args.kernels)})", "", kernel_table(args.kernels), ""]
        if args.cp:
            parts += [f"## Context parallelism ({os.path.basename(args.cp)})", "", cp_table(args.cp), ""]
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write("\n".join(parts))


if __name__ == "__main__":
    main()
