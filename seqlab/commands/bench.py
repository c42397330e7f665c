"""seqlab bench: measured costs.

    bench scaling        time and memory against sequence length per model
    bench generate       inference throughput against batch size (prompt + new tokens), bandwidth floor, transformers
    bench long-context   chunked prefill over a very long context at constant memory; a Transformer beside it
"""

from __future__ import annotations

import argparse
import platform
import time

HELP = (
    "measure costs: `bench scaling` (time and memory vs sequence length), `bench generate` (throughput vs batch), "
    "`bench long-context` (chunked prefill to 1M tokens)"
)


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
    _register_generate(sub)
    _register_long_context(sub)


def _register_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generation throughput vs batch size (Mamba paper Fig. 8), bandwidth floor")
    gen.add_argument("--models", default="transformer:1.3b,mamba:1.4b,mamba2:1.3b", help="comma list of NAME[:SIZE]")
    gen.add_argument("--size", default="small", help="size for models given without one")
    gen.add_argument("--batch", default="1,2,4,...,128", help="batch sizes: comma list, '...' continues doubling")
    gen.add_argument("--prompt-len", default="2048", help="prompt tokens per row (k = 1024)")
    gen.add_argument("--gen-len", default="128", help="new tokens per row")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="auto: bf16 on cuda")
    gen.add_argument("--vocab-size", type=int, default=50280, help="vocabulary of the random models (GPT-NeoX's)")
    gen.add_argument("--repeats", type=int, default=None, help="timed runs per point after a warm-up (median)")
    gen.add_argument("--time-limit", type=float, default=120.0, help="skip larger batches once a run takes this")
    gen.add_argument("--state-dtype", default="fp32",
                     help="comma list of fp32, bf16, fp16: the recurrent states' dtype (SSMs; one sweep each)")
    gen.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly even where a graph would work")
    gen.add_argument("--hf", action="store_true", help="also run transformers' implementations (exported weights)")
    gen.add_argument("--hf-compile", action="store_true", help="let transformers compile its static-cache step")
    gen.add_argument("--bandwidth-bytes", default=None, help="size of the bandwidth-measuring copy (default 1g/256m)")
    gen.add_argument("--json", help="write meta, records and the measured bandwidth to this file")


def _register_long_context(sub) -> None:
    lc = sub.add_parser("long-context", help="chunked prefill over a very long context; a Transformer beside it")
    lc.add_argument("--model", default="mamba2:130m", help="NAME[:SIZE] preset (random weights)")
    lc.add_argument("--checkpoint", help="a trained checkpoint (or `train --out`) directory instead of --model")
    lc.add_argument("--context", default="1m", help="tokens to prefill (k = 1024, m = 1024^2)")
    lc.add_argument("--chunk", default="8k", help="tokens per prefill call")
    lc.add_argument("--passkey-depths", default=None, help="comma list in [0, 1]: needle depths (passkey sequence)")
    lc.add_argument("--compare", default=None, help="NAME[:SIZE] run one-shot at each milestone, e.g. transformer:130m")
    lc.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    lc.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda")
    lc.add_argument("--time-limit", type=float, default=300.0, help="stop a model once it has taken this long")
    lc.add_argument("--json", help="write meta, points and passkey results to this file")


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


def _meta(device, dtype_name: str) -> dict:
    import torch

    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _dtype(text: str, device):
    import torch

    name = ("bf16" if device.type == "cuda" else "fp32") if text == "auto" else text
    return name, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def run(args: argparse.Namespace) -> int:
    if args.bench == "generate":
        return _run_generate(args)
    if args.bench == "long-context":
        return _run_long_context(args)
    return _run_scaling(args)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from seqlab.bench import generate as G
    from seqlab.bench.memory import human_bytes, parse_count
    from seqlab.bench.roofline import measure_bandwidth
    from seqlab.commands.train import check_output_file
    from seqlab.errors import ConfigError

    check_output_file(args.json, "--json")
    batches = G.parse_int_list(args.batch, "--batch")
    prompt_len, gen_len = parse_count(args.prompt_len, "--prompt-len"), parse_count(args.gen_len, "--gen-len")
    if args.vocab_size < 2:
        raise ConfigError(f"--vocab-size: expected >= 2, got {args.vocab_size}")
    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats: expected >= 1, got {args.repeats}")
    models = G.parse_models(args.models, args.size, vocab_size=args.vocab_size)
    state_dtypes = _state_dtypes(args.state_dtype)
    device = _resolve_device(args.device)
    dtype_name, dtype = _dtype(args.dtype, device)
    repeats = args.repeats or (2 if device.type == "cuda" else 1)
    copy_bytes = None if args.bandwidth_bytes is None else parse_count(args.bandwidth_bytes, "--bandwidth-bytes")
    bandwidth = measure_bandwidth(device, copy_bytes)
    print(f"generate on {device} ({dtype_name}): prompt {prompt_len}, {gen_len} new tokens, batches {batches}")
    print(f"measured copy bandwidth {bandwidth / 1e9:,.1f} GB/s (read + write)\n")
    print(G.HEADER)
    results = []

    def show(r):
        print(G.format_row(r), flush=True)

    meta = dict(_meta(device, dtype_name), prompt_len=prompt_len, gen_len=gen_len, batches=batches,
                vocab_size=args.vocab_size, repeats=repeats, bandwidth_bytes_per_s=bandwidth)

    def save():  # after every model, so a run cut short still leaves what it measured
        if args.json:
            from seqlab.io import write_json

            write_json(args.json, {"meta": meta, "records": G.records(results)})

    for spec, name, size in models:
        model = G.build_model(name, size, device, dtype, vocab_size=args.vocab_size)
        print(f"# {spec}: {model.num_params() / 1e6:,.2f}M parameters, "
              f"{human_bytes(G.decode_step_bytes(model, 1, prompt_len)['weights'])} of weights", flush=True)
        # a model without recurrent states runs once: the state dtype would change nothing
        for state_dtype in state_dtypes if G.takes_state_dtype(model) else state_dtypes[:1]:
            results += G.bench_seqlab(model, spec, batches, prompt_len, gen_len, device, repeats, bandwidth,
                                      args.time_limit, not args.no_cuda_graph, show, state_dtype=state_dtype)
        if args.hf:
            results += G.bench_hf(model, spec, batches, prompt_len, gen_len, device, dtype, repeats, bandwidth,
                                  args.time_limit, True, args.hf_compile, show)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    return 0


def _state_dtypes(text: str) -> list:
    """'fp32,bf16' -> [torch.float32, torch.bfloat16]; ConfigError naming --state-dtype otherwise."""
    from seqlab.bench.generate import DTYPES
    from seqlab.errors import ConfigError

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise ConfigError(f"--state-dtype: expected a comma list of fp32, bf16, fp16, got {text!r}")
    return [DTYPES[n] for n in dict.fromkeys(names)]


def _run_long_context(args: argparse.Namespace) -> int:
    import torch

    from seqlab.bench import long_context as LC
    from seqlab.bench.generate import build_model, parse_models
    from seqlab.bench.memory import parse_count
    from seqlab.commands.train import check_output_file
    from seqlab.errors import ConfigError

    check_output_file(args.json, "--json")
    context, chunk = parse_count(args.context, "--context"), parse_count(args.chunk, "--chunk")
    if chunk > context:
        raise ConfigError(f"--chunk: expected at most --context ({context}), got {chunk}")
    depths = None
    if args.passkey_depths:
        try:
            depths = [float(d) for d in args.passkey_depths.split(",") if d.strip()]
        except ValueError:
            raise ConfigError(f"--passkey-depths: expected numbers in [0, 1], got {args.passkey_depths!r}") from None
        if not depths or any(not 0 <= d <= 1 for d in depths):
            raise ConfigError(f"--passkey-depths: expected numbers in [0, 1], got {args.passkey_depths!r}")
        LC.check_passkey_context(context)
    compare = parse_models(args.compare, option="--compare") if args.compare else []
    if args.checkpoint is None:
        models = parse_models(args.model, option="--model")
        if len(models) != 1:
            raise ConfigError(f"--model: expected one NAME[:SIZE] preset, got {args.model!r} (use --compare for more)")
        (spec, name, size), = models
    device = _resolve_device(args.device)
    dtype_name, dtype = _dtype(args.dtype, device)
    if args.checkpoint is not None:
        from seqlab.commands.evaluate import find_checkpoint
        from seqlab.models import LanguageModel

        directory = find_checkpoint(args.checkpoint)  # a checkpoint or a run directory, as eval takes
        model, spec, weights = LanguageModel.load(directory, device=device), args.checkpoint, str(directory)
        model = model.to(dtype=dtype).eval()
    else:
        model, weights = build_model(name, size, device, dtype), "random"
    print(f"long-context on {device} ({dtype_name}): {context} tokens in chunks of {chunk}")
    print(LC.HEADER)

    def show(p):
        print(LC.format_point(p), flush=True)

    points, passkeys = [], []
    meta = dict(_meta(device, dtype_name), context=context, chunk=chunk, weights=weights)

    def save():  # after every run, so a run cut short still leaves what it measured
        if args.json:
            from seqlab.io import write_json

            write_json(args.json, {"meta": meta, "points": LC.records(points), "passkey": LC.records(passkeys)})

    if depths is None:
        points += LC.chunked_prefill(model, spec, context, chunk, device, time_limit=args.time_limit, on_point=show)[0]
    for depth in depths or []:
        run_points, result = LC.passkey_run(model, spec, context, chunk, depth, device, weights,
                                            time_limit=args.time_limit, on_point=show)
        points += run_points
        passkeys.append(result)
        print(f"  passkey at depth {depth:.2f}: answer {result.answer!r}, decoded {result.decoded!r}, "
              f"retrieved {result.retrieved}" + (" (random weights)" if weights == "random" else ""), flush=True)
        save()
    save()
    del model
    for cspec, cname, csize in compare:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        other = build_model(cname, csize, device, dtype)
        points += LC.one_shot(other, cspec, LC.milestones(context, chunk), device, args.time_limit, on_point=show)
        del other
        save()
    return 0


def _run_scaling(args: argparse.Namespace) -> int:
    import torch

    from seqlab.bench.generate import parse_models
    from seqlab.bench.memory import parse_count
    from seqlab.bench.scaling import as_records, loglog_slope, measure
    from seqlab.commands.train import check_output_file
    from seqlab.errors import ConfigError
    from seqlab.models.presets import from_preset

    device = _resolve_device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(args.dtype)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    lengths = [parse_count(x, "--lengths") for x in args.lengths.split(",") if x.strip()]
    if not lengths:
        raise ConfigError(f"--lengths: expected a comma list of lengths like 256,1k, got {args.lengths!r}")
    if args.batch < 1:
        raise ConfigError(f"--batch: expected >= 1, got {args.batch}")
    if args.decode_steps < 1:
        raise ConfigError(f"--decode-steps: expected >= 1, got {args.decode_steps}")
    if not args.time_limit > 0:
        raise ConfigError(f"--time-limit: expected a number of seconds > 0, got {args.time_limit}")
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    models = parse_models(args.models, args.size, **overrides)  # every preset checked before any measurement
    records, slopes = [], {}
    print(f"{args.mode} on {device} ({'bf16' if dtype else 'fp32'}), batch {args.batch}")
    print(f"{'model':<20} {'length':>9} {'status':<20} {'time':>12} {'tokens/s':>12} {'peak mem':>12}")
    for spec, name, size in models:
        torch.manual_seed(0)
        model = from_preset(name, size, **overrides)

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
