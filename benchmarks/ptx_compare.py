"""Whether a refactor changed the machine code of the chunk kernels: compile rows of kernel_resources.py at this
tree and at another git revision (for sm_90a, on a CPU machine) and compare their PTX instructions.

    python benchmarks/ptx_compare.py --rev b8829c3 --rows wy_bwd "output_channel_bwd_qp (kept Δ)"

Kernel names, parameter declarations and loads, labels, comments and debug sections are left out of the comparison
and registers are renumbered by first use (a kernel split out of another keeps its instructions but not its name or
parameter list). "same" means the same
instructions in the same order: what a GPU test proved at the other revision holds here (same Triton version).
Rows missing at the other revision are reported as such.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DUMP = r'''
import os, re, sys, json
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import kernel_resources as kr
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
here = os.path.realpath(os.getcwd())
assert os.path.realpath(kr.wy.__file__).startswith(here), f"kernels imported from {kr.wy.__file__}, not {here}"
want, out = set(json.loads(sys.argv[1])), {}
for name, kernel, consts, warps, stages in kr.kernels(128, 128):
    if name not in want:
        continue
    consts = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **consts}
    src = ASTSource(fn=kernel, signature=kr.signature(name, kernel, consts), constexprs=consts)
    out[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
json.dump(out, open(sys.argv[2], "w"))
'''


def instructions(ptx: str) -> list[str]:
    """The instruction lines of a kernel's PTX, without names, parameters, labels, comments or debug data."""
    ptx = ptx.split(".section", 1)[0]
    lines = []
    for line in ptx.split("\n"):
        line = re.sub(r"//.*$", "", line).strip()
        if not line or line.endswith(":") or line.startswith((".loc", ".file", ".visible", ".entry", ".param")):
            continue
        if "param" in line:  # ld.param of an argument whose index moved
            continue
        lines.append(re.sub(r"\$L__\w+", "L", line))
    # registers renumbered by first use (one more parameter loaded shifts every number after it)
    names: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        return names.setdefault(m.group(0), f"%{m.group(1)}#{sum(k.startswith('%' + m.group(1)) for k in names)}")

    return [re.sub(r"%(rd|r|f|fd|p|rs|h|hh|b)\d+", rename, line) for line in lines]


def dump(tree: str, rows: list[str]) -> dict:
    import json

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-c", DUMP, json.dumps(rows), f.name], cwd=tree, check=True,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
        return json.load(open(f.name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="the git revision to compare with")
    ap.add_argument("--rows", nargs="+", required=True, help="kernel_resources.py row names")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "tree")
        subprocess.run(["git", "worktree", "add", "-q", "--detach", other, args.rev], cwd=ROOT, check=True)
        try:
            for link in ("kernels", "megatron_patches"):  # the package's mapping, as on the GPU machine
                os.symlink(os.path.join("..", link), os.path.join(other, "pdelta_cp", link))
            here, there = dump(ROOT, args.rows), dump(other, args.rows)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", other], cwd=ROOT, check=False)
    for row in args.rows:
        if row not in here or row not in there:
            print(f"{row}: missing {'here' if row not in here else 'at ' + args.rev}")
            continue
        a, b = instructions(there[row]), instructions(here[row])
        print(f"{row}: {'same' if a == b else 'DIFFERENT'} ({len(a)} / {len(b)} instructions)")


if __name__ == "__main__":
    main()
