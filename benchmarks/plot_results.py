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


def plot_cp(path: str, out: str) -> None:
    rows, seen = [], set()
    for r in json.load(open(path))["rows"]:  # the first measurement of each point (later calls repeat some)
        key = (r["method"], r["variant"], r["scaling"], r["T_global"], r["ranks"])
        if "fwd_bwd_ms" in r and r["scaling"] == "strong" and key not in seen:
            seen.add(key)
            rows.append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows}):
            for T in sorted({r["T_global"] for r in rows}):
                pts = sorted((r["ranks"], r["fwd_bwd_ms"]) for r in rows
                             if (r["method"], r["variant"], r["T_global"]) == (method, variant, T))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{method} {variant} T={T // 1024}K")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("fwd+bwd ms (slowest rank, median)")
    ax.set_xticks(sorted({r["ranks"] for r in rows}))
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("one layer, H=16, K=V=128, bf16")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp")
    ap.add_argument("--kernels")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if args.cp:
        plot_cp(args.cp, args.out)
    if args.kernels:
        plot_kernels(args.kernels, args.out)


if __name__ == "__main__":
    main()
