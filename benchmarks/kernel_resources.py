"""Registers, spills and shared memory of the chunk kernels, compiled for a GPU without one (ptxas -v).

    python benchmarks/kernel_resources.py [--arch 90] [--K 128] [--V 128] [--out resources.json]

Each kernel is compiled as the ops launch it (tile config, warps, stages) for sm_<arch> and run through the
ptxas that ships with Triton in verbose mode. A kernel that spills registers to local memory reads and writes
them per thread in its inner loops: on Hopper that costs more than the arithmetic (PKDA's WY backward at
K = V = 128 spilled 6 KB per thread and took 17 ms per 32K-token call). Runs on CPU machines (no driver needed);
the Triton version changes the numbers somewhat — the GPU image's is the one that counts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the shell says
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdelta_cp.kernels import channel, output, state_pass, wy  # noqa: E402
from pdelta_cp.kernels import stages as stages_mod  # noqa: E402
from pdelta_cp.kernels._triton_utils import chunk_tile_config  # noqa: E402

CHUNK_INTS = {"H", "HV", "G"}  # integer (not pointer) arguments: head counts and the value heads per key head
STATE_INTS = {"HV", "NCH"}  # (G is a pointer there: the state gradient)
INT_POINTERS = {"FIRST", "LENGTH", "LENS"}  # int32; STARTS is int64


def kernels(K: int, V: int) -> list[tuple[str, object, dict, int, int]]:
    """(name, kernel, constexprs, num_warps, num_stages) as the ops launch them for K, V (state kernels: the
    plain pass over V columns, the split backward)."""
    BK, BV, warps, stages = chunk_tile_config(K, V)
    chunk = dict(K=K, V=V, C=64, BK=BK, BV=BV, PRECISION="tf32")
    sBK, sBV, swarps, sstages = state_pass._config(K, V)
    state = dict(K=K, V=V, C=64, BK=sBK, BV=sBV, PRECISION="tf32")
    blocked_warps = wy._pick_wy_forward(K)[1] or warps
    bwd_warps = stages_mod.wy_backward_warps(K, warps)
    return [
        ("wy_fwd (row)", wy._wy_fwd_kernel, chunk, warps, stages),
        ("wy_fwd (blocked)", wy._wy_fwd_blocked_kernel, dict(chunk, DOUBLING=False), blocked_warps, stages),
        ("wy_bwd", wy._wy_bwd_kernel, chunk, stages_mod.wy_backward_warps(K, warps), stages),
        ("output_fwd", output._out_fwd_kernel, chunk, warps, stages),
        ("output_bwd_state", output._out_bwd_state_kernel, chunk, warps, stages),
        ("output_bwd_qp", output._out_bwd_qp_kernel, chunk, warps, stages),
        ("output_bwd_qp (scratch)", output._out_bwd_qp_kernel, dict(chunk, SCRATCH=True), warps, stages),
        ("wy_channel_fwd", channel._wy_ch_fwd_kernel, chunk, channel._pick_wy_channel_forward(K)[1] or warps, stages),
        ("wy_channel_fwd (blocked)", channel._wy_ch_fwd_blocked_kernel, chunk, 4, stages),
        ("wy_fwd (blocked, remake from T)", wy._wy_fwd_blocked_kernel, dict(chunk, DOUBLING=False, FROM_T=True),
         blocked_warps, stages),
        ("wy_channel_fwd (remake from T)", channel._wy_ch_fwd_kernel, dict(chunk, FROM_T=True),
         channel._pick_wy_channel_forward(K)[1] or warps, stages),
        ("wy_channel_bwd", channel._wy_ch_bwd_kernel, chunk, stages_mod.wy_backward_warps(K, warps), stages),
        ("output_channel_fwd", channel._out_ch_fwd_kernel, chunk, warps, stages),
        ("output_channel_bwd_state", channel._out_ch_bwd_state_kernel, chunk, warps, stages),
        ("output_channel_bwd_qp", channel._out_ch_bwd_qp_kernel, chunk, warps, stages),
        ("output_channel_bwd_qp (scratch)", channel._out_ch_bwd_qp_kernel, dict(chunk, SCRATCH=True), warps, stages),
        ("state_fwd", state_pass._state_fwd_kernel, dict(state, SUMMARY=False, STORE_STARTS=True),
         state_pass.forward_warps(K, swarps), sstages),
        ("state_bwd", state_pass._state_bwd_kernel, dict(state, STORE_GRADS=False, STORE_LAM=True), swarps, sstages),
        ("state_grads", state_pass._state_grads_kernel, state, swarps, sstages),
        # PDELTA_KEEP_DELTA=1: Δ read instead of formed from W, U and S
        ("output_fwd (kept Δ)", output._out_fwd_kernel, dict(chunk, HAS_DELTA=True), warps, stages),
        ("output_bwd_qp (kept Δ)", output._out_bwd_qp_kernel, dict(chunk, HAS_DELTA=True), warps, stages),
        ("output_channel_fwd (kept Δ)", channel._out_ch_fwd_kernel, dict(chunk, HAS_DELTA=True), warps, stages),
        ("output_channel_bwd_qp (kept Δ)", channel._out_ch_bwd_qp_kernel, dict(chunk, HAS_DELTA=True), warps,
         stages),
        ("state_fwd (kept Δ)", state_pass._state_fwd_kernel, dict(state, SUMMARY=False, STORE_STARTS=True,
                                                                   STORE_DELTA=True),
         state_pass.forward_warps(K, swarps), sstages),
        ("state_grads (kept Δ)", state_pass._state_grads_kernel, dict(state, HAS_DELTA=True), swarps, sstages),
        # the output stage's dW formed by the state pass (the default since session p; the rows above without
        # "dW fused" are the PDELTA_FUSE_DW=0 path)
        ("output_bwd_state (dW fused)", output._out_bwd_state_kernel, dict(chunk, STORE_DW=False), warps, stages),
        ("output_channel_bwd_state (dW fused)", channel._out_ch_bwd_state_kernel, dict(chunk, STORE_DW=False), warps,
         stages),
        ("state_grads (kept Δ, dW fused)", state_pass._state_grads_kernel,
         dict(state, HAS_DELTA=True, ACCUMULATE=True, DW_FROM_SUM=True), swarps, sstages),
        # the split WY backward (default for PKDA — "wy_channel_bwd" above is its PDELTA_WY_BWD_SPLIT=0 path —
        # and PDELTA_WY_BWD_SPLIT=1 for PGDN): a dL kernel, then the key side
        ("split WY backward: dL", wy._wy_bwd_dl_kernel, chunk, bwd_warps, stages),
        ("split WY backward: keys", wy._wy_bwd_kernel, dict(chunk, FROM_DL=True), bwd_warps, stages),
        ("split WY backward: keys, key blocks 32", wy._wy_bwd_kernel, dict(chunk, FROM_DL=True, KB=32), bwd_warps,
         stages),
        ("split WY backward: keys, key blocks 64", wy._wy_bwd_kernel, dict(chunk, FROM_DL=True, KB=64), bwd_warps,
         stages),
        ("split channel WY backward: dL", channel._wy_ch_bwd_dl_kernel, chunk, bwd_warps, stages),
        ("split channel WY backward: keys", channel._wy_ch_bwd_kernel, dict(chunk, FROM_DL=True), bwd_warps, stages),
        # PDELTA_WY_KEY_BLOCKS=16 / 32: PKDA's blocked WY forward in key-column blocks
        ("wy_channel_fwd (blocked, key blocks 16)", channel._wy_ch_fwd_blocked_kernel, dict(chunk, KB=16), 4, stages),
        ("wy_channel_fwd (blocked, key blocks 32)", channel._wy_ch_fwd_blocked_kernel, dict(chunk, KB=32), 4, stages),
        # PDELTA_OUTPUT_KEY_BLOCKS=16: PKDA's output kernels in key-column blocks
        ("output_channel_fwd (kept Δ, key blocks 16)", channel._out_ch_fwd_kernel, dict(chunk, HAS_DELTA=True, KB=16),
         warps, stages),
        ("output_channel_bwd_state (dW fused, key blocks 16)", channel._out_ch_bwd_state_kernel,
         dict(chunk, STORE_DW=False, KB=16), warps, stages),
        ("output_channel_bwd_qp (kept Δ, key blocks 16)", channel._out_ch_bwd_qp_kernel,
         dict(chunk, HAS_DELTA=True, KB=16), warps, stages),
        # PDELTA_WY_BWD_DP_IN_DL=1: the P side in the dL kernel
        ("split channel WY backward: dL + P side", channel._wy_ch_bwd_dl_kernel, dict(chunk, WITH_DP=True), bwd_warps,
         stages),
        ("split channel WY backward: keys, P done", channel._wy_ch_bwd_kernel, dict(chunk, FROM_DL=True, DP_DONE=True),
         bwd_warps, stages),
    ]


def signature(name: str, kernel, constexprs: dict) -> dict:
    ints = STATE_INTS if name.startswith("state") else CHUNK_INTS
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ints:
            sig[p.name] = "i32"
        else:
            sig[p.name] = "*i32" if p.name in INT_POINTERS else "*i64" if p.name == "STARTS" else "*fp32"
    return sig


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread from ptxas -v (the bundled ptxas, or its newer sibling)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for tool in ("ptxas", "ptxas-blackwell"):
            path = os.path.join(folder, tool)
            if not os.path.exists(path):
                continue
            run = subprocess.run([path, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                text = run.stdout + run.stderr
                number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
                return {"registers": number(r"Used (\d+) registers"),
                        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
                        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
                        "stack_bytes": number(r"(\d+) bytes stack frame")}
    raise RuntimeError("no bundled ptxas could assemble the PTX")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None, help="kernel names containing any of these")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    print(f"{'kernel':34s} {'warps':>5s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'shared':>8s}")
    for name, kernel, consts, warps, stages in kernels(args.K, args.V):
        if args.only and not any(o in name for o in args.only):
            continue
        # constexpr defaults the launch leaves out (ASTSource would pass None for them)
        consts = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **consts}
        src = ASTSource(fn=kernel, signature=signature(name, kernel, consts), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        row = {"kernel": name, "num_warps": warps, "num_stages": stages, "K": args.K, "V": args.V,
               "shared_bytes": compiled.metadata.shared, **ptxas_report(compiled.asm["ptx"], args.arch)}
        rows.append(row)
        print(f"{name:34s} {warps:5d} {row['registers']:5d} {row['spill_store_bytes']:9d} "
              f"{row['spill_load_bytes']:9d} {row['shared_bytes']:8d}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "arch": f"sm_{args.arch}a", "command": " ".join(sys.argv),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
