"""Memory per token of one model block, the number that decides how long a context fits per GPU.

With per-block recomputation a training step holds the residual stream (one block input per layer) plus one
block's recomputed forward and backward. This measures, for one ``Block`` of a preset's shape under bf16
autocast (CPU: Triton kernels under TRITON_INTERPRET=1), the bytes kept after its forward and the peak of
forward + backward, at two lengths; the difference per token removes the parameter-sized terms.

    python benchmarks/block_memory.py --config 340m --T 256 768 --out docs/benchmarks/block_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_stats import _LiveBytes, _uncounted_kernel_launches  # noqa: E402

from pdelta_cp.model import Block  # noqa: E402
from pdelta_cp.train.config import load_config  # noqa: E402


def block_bytes(block: Block, T: int, d_model: int, backend: str, device: str) -> dict:
    """Live bytes (beyond the block input) after forward, and the peak over forward + backward."""
    x = torch.randn(1, T, d_model, dtype=torch.bfloat16, device=device, requires_grad=True)

    def step(live=None):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y = block(x, backend=backend)
        after_forward = live.current if live is not None else 0
        y.float().sum().backward()
        return after_forward

    step()  # warm-up: cached plans and index tensors, as in training
    _uncounted_kernel_launches()
    live = _LiveBytes(exclude={x.untyped_storage().data_ptr()})  # views of the input are no new memory
    with live:
        after_forward = step(live)
    return {"T": T, "after_forward": after_forward, "peak": live.peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="340m")
    ap.add_argument("--T", type=int, nargs=2, default=[256, 768], help="two lengths (their difference per token)")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        from pdelta_cp.kernels._triton_utils import patch_interpreter_bf16
        patch_interpreter_bf16()
    cfg = load_config(args.config).model
    torch.manual_seed(0)
    block = Block(cfg).to(args.device)
    rows = [block_bytes(block, T, cfg.d_model, args.backend, args.device) for T in args.T]
    (a, b), span = rows, args.T[1] - args.T[0]
    result = {"config": args.config, "variant": cfg.variant, "d_model": cfg.d_model, "heads": cfg.num_heads,
              "head_dim": cfg.head_dim, "backend": args.backend, "device": args.device, "torch": torch.__version__,
              "rows": rows,
              "kept_after_forward_KB_per_token": (b["after_forward"] - a["after_forward"]) / span / 1024,
              "peak_fwd_bwd_KB_per_token": (b["peak"] - a["peak"]) / span / 1024,
              "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
