"""seqlab memory: weights, KV cache / recurrent state and activations of a model at a context length."""

from __future__ import annotations

import argparse
import json

HELP = "plan memory: weights, KV cache or recurrent state, and activations at a context length"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        help="a seqlab preset as NAME[:SIZE] (e.g. mamba:1.4b), a public model (see --list), or a path to a "
        "seqlab config.json; repeat for several; default: every public model",
    )
    parser.add_argument("--context", default="128k", help="tokens per sequence: 4096, 128k, 1m (k = 1024)")
    parser.add_argument(
        "--prefill-chunk", help="consume the prompt in chunks of this many tokens (activations scale with it)"
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences held at once")
    parser.add_argument("--dtype", default="bf16", help="dtype of weights, KV cache and activations")
    parser.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the recurrent (SSM and conv) states (default fp32)")
    parser.add_argument("--vocab-size", type=int, default=50280, help="vocabulary of seqlab presets (default 50280)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--list", action="store_true", help="list the public models and presets known here")


def run(args: argparse.Namespace) -> int:
    from seqlab.bench.memory import human_bytes, parse_count, plan, public_specs
    from seqlab.bench.memory_presets import resolve_spec

    if args.list:
        for name, spec in public_specs().items():
            print(f"{name:<18} {spec.source}")
        from seqlab.models.presets import PRESETS, SIZES

        print(f"\nseqlab presets: {', '.join(PRESETS)}; sizes: {', '.join(SIZES)}  (write NAME:SIZE)")
        return 0
    context = parse_count(args.context, "--context")
    chunk = parse_count(args.prefill_chunk, "--prefill-chunk") if args.prefill_chunk else None
    if args.batch < 1:
        from seqlab.errors import ConfigError

        raise ConfigError(f"--batch: expected >= 1, got {args.batch}")
    names = args.model or list(public_specs())
    plans = [
        plan(resolve_spec(name, vocab_size=args.vocab_size), context, args.batch, args.dtype, prefill_chunk=chunk,
             state_dtype=args.state_dtype)
        for name in names
    ]
    if args.json:
        print(json.dumps(plans, indent=2))
        return 0
    prefill = f"prefill in chunks of {chunk:,}" if chunk else "one-shot prefill"
    print(f"memory at context {context:,} tokens, batch {args.batch}, {args.dtype}, {prefill} "
          f"(SSM states in {args.state_dtype})")
    header = (
        f"{'model':<18} {'params':>8} {'weights':>11} {'KV cache':>11} {'SSM state':>11} {'activations':>12}"
        f" {'total':>11} {'score entries':>14}"
    )
    print(header)
    print("-" * len(header))
    for p in plans:
        print(
            f"{p['model']:<18} {_params(p['params']):>8} {human_bytes(p['weights_bytes']):>11}"
            f" {human_bytes(p['kv_cache_bytes']):>11} {human_bytes(p['recurrent_state_bytes']):>11}"
            f" {human_bytes(p['activation_bytes']):>12} {human_bytes(p['total_bytes']):>11}"
            f" {p['attention_score_entries']:>14.3g}"
        )
    print("\nactivation peak (the moment of the prefill with the most bytes alive, largest tensors first):")
    for p in plans:
        print(f"  {p['model']}: {_peak_breakdown(p)}")
    notes = [(p["model"], note) for p in plans for note in p["notes"]]
    if notes:
        print("\nnotes:")
        for model, note in notes:
            print(f"  {model}: {note}")
    print(
        "\nactivations: the most bytes alive at one moment of a one-shot prefill with a preallocated state (the"
        "\nlargest layer's worst step on CUDA under inference mode: Triton conv/scan/SSD buffers, float32 upcasts,"
        "\nRoPE, fused attention; --prefill-chunk scales it down); total = weights + cache/state + the larger of the"
        "\nactivations and the state snapshot of recording the CUDA decode graph."
        "\nscore entries: heads x T x T over attention layers, what eager attention would "
        "materialise per sequence."
    )
    return 0


def _peak_breakdown(p: dict, count: int = 4) -> str:
    """'<phase> <total>: <tensor> <bytes> (<share>), ...' for the ``count`` largest tensors of the peak."""
    from seqlab.bench.memory import human_bytes

    peak, total = p["activation_peak"], p["activation_bytes"]
    parts = [f"{b['name']} {human_bytes(b['nbytes'])} ({100 * b['nbytes'] / total:.0f}%)"
             for b in peak["buffers"][:count] if b["nbytes"]]
    return f"{peak['phase']} {human_bytes(total)}: " + ", ".join(parts)


def _params(count: float) -> str:
    """A parameter count at three significant digits: 25.3K, 129M, 1.37B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"
