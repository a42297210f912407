"""Which products of the chunk algorithm tolerate bf16 operands? A CPU study in float64 (no GPU needed).

The op runs on the PyTorch chunk path in float64 from bf16-valued inputs; one product site at a time has its two
operands rounded to bf16 (what a bf16 tensor-core product with a float32 accumulator sees), and the output and final
state are compared with the exact run. The error the kernels already carry — O stored in bf16 and the chunk states
stored in bf16 (session l) — is printed as the floor a site's error should stay well under. Forward sites only: the
backward's products mirror them (a site that hurts forward will hurt its transpose).

The regime-check row shows how much the state pass feeds W·S back at all: with the reference tests' gates
(decay_strength 1) a chunk's entering state is nearly forgotten by its end (a 1% change of W·S moves the final
state by ~2e-8), so the study also runs weak gates (0.02: states that live thousands of tokens), and PDN (no gate).

    python benchmarks/precision_sites.py --T 4096 --H 4 --out docs/benchmarks/precision_sites_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.chunk import delta as delta_mod  # noqa: E402
from pdelta_cp.testing import call, make_inputs, rel_rms  # noqa: E402


def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 (nearest even) and back to its own dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


# site name -> which operands of which product are rounded; read by the patched step/output below
SITES = {
    "state pass: W·S": ("step", "WS"),
    "(regime check) state pass: W·S scaled by 1.01": ("step", "WS1%"),
    "state pass: P̃ᵀ·Δ": ("step", "PD"),
    "output: chunk states stored in bf16 alone (the default for 16-bit inputs)": ("output", "S"),
    "output: W·S (with bf16 states)": ("output", "WS"),
    "output: (Q̂⊙e^Γ)·S (with bf16 states)": ("output", "QS"),
    "output: gram(Q̂,P)·Δ (with bf16 states)": ("output", "AD"),
}


@contextlib.contextmanager
def rounded(where: str, what: str):
    """Patch DeltaChunks.step / .output so that the chosen product sees bf16 operands."""
    real_step, real_output = delta_mod.DeltaChunks.step, delta_mod.DeltaChunks.output

    def step(self, ids, S):
        W, U, Pt, d = self.W[ids], self.U[ids], self.p_tilde[ids], self.decay[ids]
        delta = U - (bf16(W) @ bf16(S) if what == "WS" else 1.01 * (W @ S) if what == "WS1%" else W @ S)
        carry = bf16(Pt).mT @ bf16(delta) if what == "PD" else Pt.mT @ delta
        return d[..., None] * S + carry

    def output(self, S_start):
        S = bf16(S_start)  # the chunk states are stored in bf16 (session l): every output site sits on top of that
        delta = self.U - (bf16(self.W) @ S if what == "WS" else self.W @ S)
        state = bf16(self.q_decayed) @ S if what == "QS" else self.q_decayed @ S
        intra = bf16(self.qp) @ bf16(delta) if what == "AD" else self.qp @ delta
        return state + intra

    if where == "step":
        delta_mod.DeltaChunks.step = step
    else:
        delta_mod.DeltaChunks.output = output
    try:
        yield
    finally:
        delta_mod.DeltaChunks.step, delta_mod.DeltaChunks.output = real_step, real_output


def run(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        o, S, _ = call(precond_delta_rule, inp, output_final_state=True, backend="torch")
    return o, S


def study(variant: str, T: int, H: int, K: int, V: int, decay_strength: float = 1.0) -> dict:
    inp = make_inputs(B=1, T=T, H=H, K=K, V=V, variant=variant, dtype=torch.bfloat16, decay_strength=decay_strength)
    inp = {n: t.detach().double() for n, t in inp.items()}  # bf16 values, float64 arithmetic
    o_ref, S_ref = run(inp)
    rows = {"o stored in bf16 (every kernel)": {"o": rel_rms(bf16(o_ref), o_ref), "final_S": 0.0}}
    for name, (where, what) in SITES.items():
        with rounded(where, what):
            o, S = run(inp)
        rows[name] = {"o": rel_rms(o, o_ref), "final_S": rel_rms(S, S_ref)}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=["pdn", "pgdn", "pkda"])
    ap.add_argument("--decay-strength", type=float, nargs="+", default=[1.0, 0.02],
                    help="gate scales: 1 = the reference tests' gates, 0.02 = states that live thousands of tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"T": args.T, "H": args.H, "K": args.K, "V": args.V, "inputs": "bf16 values, float64 arithmetic",
              "command": "python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "torch": torch.__version__, "variants": {}}
    for variant in args.variants:
        for strength in ([1.0] if variant == "pdn" else args.decay_strength):  # PDN has no gate
            rows = study(variant, args.T, args.H, args.K, args.V, strength)
            key = variant if variant == "pdn" else f"{variant} (decay_strength {strength:g})"
            result["variants"][key] = rows
            print(f"\n{key}: relative RMS error against the exact float64 run")
            for name, e in rows.items():
                print(f"  {name:62s} o {e['o']:.2e}   final S {e['final_S']:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
