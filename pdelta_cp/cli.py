"""Command line.

    pdelta-cp train --config tiny --out DIR [--set section.field=value ...] [--resume]
    pdelta-cp preprocess FILE... --out DIR [--tokenizer bytes|HF_NAME]   (then --set data.task=tokens
                                                                          --set data.path=DIR)
    pdelta-cp demo [--nproc N] [--dtype float32|float64]

Without a launcher (torchrun, deepspeed, mpirun) the command starts ``parallel.nproc`` local processes itself
(the tiny config asks for 2: CP=2 over gloo on CPU), through the same code path a launcher uses.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pdelta-cp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a PDN/PGDN/PKDA (or GDN/KDA/DeltaNet) language model")
    train.add_argument("--config", required=True, help="preset (tiny, 340m, 1b) or a .json file")
    train.add_argument("--out", default="out",
                       help="output folder: metrics.jsonl, loss.png, checkpoint-<step>.pt + checkpoint.json")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override a config field, e.g. --set optim.lr=1e-3 --set model.variant=pkda")
    train.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in OUT, if any")
    train.add_argument("--nproc", type=int, default=None, help="processes to start without a launcher")
    prep = sub.add_parser("preprocess", help="tokenise text files into a memory-mapped corpus (data.task=tokens)")
    prep.add_argument("inputs", nargs="+", help="UTF-8 text files (one document each)")
    prep.add_argument("--out", required=True, help="output folder (tokens.bin, meta.json)")
    prep.add_argument("--tokenizer", default="bytes", help="bytes, or a local Hugging Face tokenizer name/path")
    demo = sub.add_parser("demo", help="run PDN/PGDN/PKDA with context parallelism and compare with one process")
    demo.add_argument("--nproc", type=int, default=2, help="processes to start when not under a launcher")
    demo.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)

    from .distributed import run_distributed

    if args.command == "train":
        from .train.config import load_config
        from .train.loop import train_worker

        cfg = load_config(args.config, args.overrides)
        run_distributed(train_worker, args.nproc or cfg.parallel.nproc, (cfg, args.out, args.resume))
    elif args.command == "preprocess":
        from .train.data import preprocess

        meta = preprocess(args.inputs, args.out, args.tokenizer)
        print(f"wrote {meta['num_tokens']} tokens (vocabulary {meta['vocab_size']}) to {args.out}")
    elif args.command == "demo":
        from .demo import demo_worker

        run_distributed(demo_worker, args.nproc, (args.dtype,), backend="gloo")


if __name__ == "__main__":
    main()
