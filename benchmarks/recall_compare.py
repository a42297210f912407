"""Recall quality: PDN/PGDN/PKDA against DeltaNet/GDN/KDA, trained with the same budget through the same CLI.

    python benchmarks/recall_compare.py --out docs/benchmarks/recall.json [--steps 400] [--seeds 0 1]

Each run: `pdelta-cp train --config tiny` with CP=1 in one process and the overrides below; the score is
the mean query accuracy (and loss) over the last five logged steps. Writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = ("deltanet", "pdn", "gdn", "pgdn", "kda", "pkda")


def run(variant: str, seed: int, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pdelta_cp.cli", "train", "--config", "tiny", "--out", out, "--nproc", "1",
               "--set", "parallel.cp=1", "--set", f"model.variant={variant}", "--set", f"seed={seed}",
               "--set", f"data.seed={1000 + seed}", "--set", f"steps={steps}", "--set", "log_every=10", *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    tail = rows[-5:]
    return {"variant": variant, "seed": seed, "accuracy": sum(r["accuracy"] for r in tail) / len(tail),
            "loss": sum(r["loss"] for r in tail) / len(tail), "curve": [(r["step"], r["accuracy"]) for r in rows]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="recall.json")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append",
                    default=["model.vocab_size=128", "data.seq_len=128", "data.num_kv_pairs=8"])
    args = ap.parse_args()
    extra = [x for o in args.overrides for x in ("--set", o)]
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            r = run(variant, seed, args.steps, extra)
            results.append(r)
            print(f"{variant:9} seed {seed}: accuracy {r['accuracy']:.3f} loss {r['loss']:.3f}", flush=True)
            with open(args.out, "w") as f:
                json.dump({"command": " ".join(sys.argv), "settings": args.overrides, "steps": args.steps,
                           "results": results}, f, indent=1)
    table = ["| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |",
             "|---" * (len(args.seeds) + 2) + "|"]
    for v in args.variants:
        accs = [r["accuracy"] for r in results if r["variant"] == v]
        table.append(f"| {v} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")
    print("\n".join(table))
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
