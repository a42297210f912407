"""Command line: ``pdelta-cp demo [--nproc N] [--dtype float32|float64]``."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pdelta-cp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run PDN/PGDN/PKDA with context parallelism and compare with one process")
    demo.add_argument("--nproc", type=int, default=2, help="processes to start when not under a launcher")
    demo.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import demo_worker
        from .distributed import run_distributed

        run_distributed(demo_worker, args.nproc, (args.dtype,), backend="gloo")


if __name__ == "__main__":
    main()
