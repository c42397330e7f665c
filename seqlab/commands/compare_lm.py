"""seqlab compare-lm: train model families on the same text for the same tokens; loss vs FLOPs and wall time.

    seqlab compare-lm --models transformer,mamba,mamba2 --sizes tiny --tokens 200000 --data stdlib
    seqlab compare-lm --models transformer,mamba2,jamba --sizes tiny,small --tokens 2m --out runs/lm --device cuda
"""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "train model families on the same text for the same tokens; results.json + report.html (loss vs FLOPs/time)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="transformer,mamba,mamba2,jamba", help="comma-separated presets")
    parser.add_argument("--sizes", default="tiny", help="comma-separated preset sizes (default tiny)")
    parser.add_argument("--tokens", default="200000", help="training tokens per run, e.g. 200000, 500k, 2m")
    parser.add_argument("--data", default="stdlib", help="text: file, folder, glob or 'stdlib' (default)")
    parser.add_argument("--tokenizer", metavar="DIR", help="local Hugging Face tokenizer (default: bytes)")
    parser.add_argument("--seqlen", type=int, default=256, help="training sequence length (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate for every run (default 2e-3)")
    parser.add_argument("--eval-tokens", default="65536", help="validation tokens scored per run, or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    parser.add_argument("--out", default="runs/compare-lm", help="output folder (default runs/compare-lm)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _split(text: str, option: str) -> list[str]:
    from seqlab.errors import ConfigError

    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise ConfigError(f"{option}: expected a comma-separated list, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from seqlab.arena.compare_lm import CompareConfig, compare_lm
    from seqlab.bench.memory import parse_count
    from seqlab.commands.train import check_writable

    eval_tokens = None if str(args.eval_tokens).lower() == "all" else parse_count(args.eval_tokens, "--eval-tokens")
    config = CompareConfig(
        models=_split(args.models, "--models"), sizes=_split(args.sizes, "--sizes"),
        tokens=parse_count(args.tokens, "--tokens"), data=args.data, tokenizer=args.tokenizer, seqlen=args.seqlen,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_tokens=eval_tokens, device=args.device,
        out_dir=args.out,
    ).validate()  # fmt: skip
    check_writable(args.out)
    command = "seqlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    results = compare_lm(config, log=log, command=command)
    print(f"{'model':<12} {'size':<6} {'params':>10} {'FLOPs':>10} {'tokens':>9} {'val loss':>9} {'val bpb':>8} "
          f"{'wall s':>8}")  # fmt: skip
    for r in results["results"]:
        if "error" in r:
            print(f"{r['model']:<12} {r['size']:<6} error: {r['error']}")
            continue
        print(f"{r['model']:<12} {r['size']:<6} {r['params']:>10,} {r['flops']:>10.3g} {r['tokens']:>9,} "
              f"{r['val_loss']:>9.4f} {r['val_bpb']:>8.4f} {r['wall_s']:>8.1f}")  # fmt: skip
    print(f"results: {args.out}/results.json  report: {args.out}/report.html")
    failed = sum("error" in r for r in results["results"])
    return 1 if failed and failed == len(results["results"]) else 0
