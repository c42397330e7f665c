"""seqlab bench: measured costs. ``bench scaling``: time and memory against sequence length per model."""

from __future__ import annotations

import argparse
import platform
import time

HELP = "measure costs: `bench scaling` (time and memory vs sequence length per model)"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="<benchmark>", required=True)
    scaling = sub.add_parser("scaling", help="wall time, tokens/s and peak memory per model and length")
    scaling.add_argument("--models", default="transformer,mamba,mamba2", help="comma list of NAME[:SIZE] presets")
    scaling.add_argument("--size", default="small", help="size for models given without one (default small)")
    scaling.add_argument("--lengths", default="256,512,1k,2k,4k", help="comma list; k = 1024, m = 1024^2")
    scaling.add_argument("--mode", default="forward", choices=("forward", "train", "decode"))
    scaling.add_argument("--batch", type=int, default=1)
    scaling.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    scaling.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda")
    scaling.add_argument("--time-limit", type=float, default=30.0, help="skip longer lengths once a call takes this")
    scaling.add_argument("--decode-steps", type=int, default=8, help="tokens timed per decode measurement")
    scaling.add_argument("--vocab-size", type=int, default=None, help="override the presets' vocabulary")
    scaling.add_argument("--json", help="write the records and fitted slopes to this file")
    scaling.add_argument("--plot", help="write a log-log plot (PNG) to this file")


def _resolve_device(text: str):
    import torch

    from seqlab.errors import ConfigError

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but torch sees no CUDA device here")
    return device


def run(args: argparse.Namespace) -> int:
    import torch

    from seqlab.bench.memory import parse_count
    from seqlab.bench.scaling import as_records, loglog_slope, measure
    from seqlab.errors import ConfigError
    from seqlab.models.presets import from_preset

    device = _resolve_device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(args.dtype)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    lengths = [parse_count(x, "--lengths") for x in args.lengths.split(",") if x.strip()]
    if args.batch < 1:
        raise ConfigError(f"--batch: expected >= 1, got {args.batch}")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    records, slopes = [], {}
    print(f"{args.mode} on {device} ({'bf16' if dtype else 'fp32'}), batch {args.batch}")
    print(f"{'model':<20} {'length':>9} {'status':<20} {'time':>12} {'tokens/s':>12} {'peak mem':>12}")
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        name, _, size = spec.partition(":")
        torch.manual_seed(0)
        model = from_preset(name, size or args.size, **overrides)

        def show(p, spec=spec):
            unit = "s/token" if p.mode == "decode" else "s"
            time_text = f"{p.seconds:.4g} {unit}" if p.seconds else "-"
            rate = f"{p.tokens_per_s:,.0f}" if p.tokens_per_s else "-"
            mem = f"{p.peak_memory_bytes / 2**20:,.0f} MiB" if p.peak_memory_bytes else "-"
            print(f"{spec:<20} {p.length:>9} {p.status:<20} {time_text:>12} {rate:>12} {mem:>12}", flush=True)

        points = measure(
            model, spec, args.mode, lengths, args.batch, device, args.time_limit, args.decode_steps, dtype, show
        )
        slopes[spec] = loglog_slope(points)
        records += as_records(points)
        del model
    print("\nfitted log-log slope of time vs length (1 = linear, 2 = quadratic):")
    for spec, slope in slopes.items():
        print(f"  {spec:<20} {'-' if slope is None else f'{slope:.2f}'}")
    meta = {
        "mode": args.mode,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": "bf16" if dtype else "fp32",
        "batch": args.batch,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        from seqlab.io import write_json

        write_json(args.json, {"meta": meta, "slopes": slopes, "records": records})
    if args.plot:
        from seqlab.report.scaling_plot import plot_scaling

        plot_scaling(records, args.plot)
    return 0
