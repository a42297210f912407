"""Where the time goes: torch.profiler table of one pdelta-cp fwd+bwd (CUDA kernels by total time).

    python benchmarks/profile_op.py --variant pgdn --T 32768 --out profile.txt

--variant takes bench_kernels.py's op names: ours (pdn, pgdn, pkda) or fla-core's (fla-gdn, fla-pgdn, fla-kda,
fla-pkda), so the two can be compared kernel by kernel in one call.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_kernels import make, op_fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="pgdn")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--out", default="profile.txt")
    args = ap.parse_args()
    x = make(1, args.T, args.H, 128, 128)
    fn = op_fn(args.variant, x)
    do = torch.randn_like(x["v"])
    for _ in range(3):
        fn().backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn().backward(do)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    with open(args.out, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
