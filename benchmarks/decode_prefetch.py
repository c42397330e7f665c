"""Decode-step variants (L2 prefetch, Mamba's step kernels, branches) timed as graph replays of one model, interleaved.

    python3 benchmarks/decode_prefetch.py --model mamba:1.4b --batch 64,128 --state-dtype bf16 \
        --variants off,own,early,split,early+evict_first,split+evict_first --rounds 3 [--json FILE]

A variant is a prefetch schedule (seqlab.mixers.base.DECODE_PREFETCH: off, own, early, split), optionally with
``+evict_first`` (the selective step streams its state with L2 evict-first, seqlab.ops.triton.decode.TUNING
["state_policy"]) and ``+step_pair``, ``+step_fused`` or ``+step_auto`` (Mamba's dt projection and state update as
two kernels, as one, or whichever was timed faster: seqlab.mixers.base.FUSED_DECODE_KERNELS["dt_proj_step"]) and
``+z_branch`` (in_proj's gate half on a second stream: seqlab.mixers.base.DECODE_BRANCHES) and ``+layer`` (Mamba's
whole step as one persistent launch: seqlab.mixers.base.FUSED_DECODE_KERNELS["layer"]);
options not named take their defaults. Per batch the model is built and prefilled once (random bf16 weights, the
generation benchmark's setting); each variant records its own decode graph (checked against an eager step), and
the rounds replay every variant in turn, so drift in clocks or temperature falls on all of them alike. Prints the
median step per variant and its ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlab.generation import DecodeGraph  # noqa: E402
from seqlab.mixers.base import DECODE_BRANCHES, FUSED_DECODE_KERNELS  # noqa: E402
from seqlab.models.presets import from_preset  # noqa: E402

REPLAYS = 30
DEFAULT_STEP_KIND = FUSED_DECODE_KERNELS["dt_proj_step"]
DEFAULT_Z_BRANCH = DECODE_BRANCHES["z"]
DEFAULT_LAYER = FUSED_DECODE_KERNELS["layer"]
STEP_KINDS = {"step_pair": False, "step_fused": True, "step_auto": "auto"}  # FUSED_DECODE_KERNELS["dt_proj_step"]


def apply_variant(variant: str) -> None:
    """``schedule[+evict_first][+step_pair|step_fused|step_auto][+z_branch][+layer]``; settings not named take their
    defaults."""
    from seqlab.mixers import base
    from seqlab.ops.triton import decode

    schedule, *options = variant.split("+")
    base.DECODE_PREFETCH["schedule"] = schedule
    base.decode_prefetch_schedule()  # checks the name
    decode.TUNING["state_policy"] = ""
    base.FUSED_DECODE_KERNELS["dt_proj_step"] = DEFAULT_STEP_KIND
    base.DECODE_BRANCHES["z"] = DEFAULT_Z_BRANCH
    base.FUSED_DECODE_KERNELS["layer"] = DEFAULT_LAYER
    for option in options:
        if option == "evict_first":
            decode.TUNING["state_policy"] = option
        elif option == "z_branch":
            base.DECODE_BRANCHES["z"] = True
        elif option == "layer":
            base.FUSED_DECODE_KERNELS["layer"] = True
        elif option in STEP_KINDS:
            base.FUSED_DECODE_KERNELS["dt_proj_step"] = STEP_KINDS[option]
        else:
            raise SystemExit(f"decode_prefetch: unknown option {option!r} in variant {variant!r} (evict_first, "
                             f"z_branch, layer, {', '.join(STEP_KINDS)})")


def time_graph(graph: DecodeGraph, token: torch.Tensor) -> float:
    """Milliseconds per replayed step."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.step(token)
    start.record()
    for _ in range(REPLAYS):
        graph.step(token)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS


def run_batch(spec: str, batch: int, context: int, state_dtype: torch.dtype, variants: list[str],
              rounds: int) -> list[dict]:
    name, size = spec.split(":")
    torch.manual_seed(0)
    model = from_preset(name, size).to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    state = model.allocate_state(batch, context + 8 * REPLAYS * rounds * len(variants) + 64, device="cuda",
                                 dtype=torch.bfloat16, state_dtype=state_dtype)
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    token = torch.randint(0, vocab, (batch,), device="cuda")
    graphs = {}
    with torch.inference_mode():
        model(prompt, state=state, last_only=True)
        for variant in variants:
            apply_variant(variant)
            model(token[:, None], state=state)  # warm-up: compiles, times the GEMM choices
            graphs[variant] = DecodeGraph.record(model, state, token, vocab)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant in variants:
                if graphs[variant] is not None:
                    times[variant].append(time_graph(graphs[variant], token))
    apply_variant("off")
    rows = []
    base_ms = statistics.median(times[variants[0]]) if times[variants[0]] else None
    for variant in variants:
        ms = statistics.median(times[variant]) if times[variant] else None
        rows.append({"model": spec, "batch": batch, "variant": variant, "step_ms": ms, "rounds_ms": times[variant],
                     "vs_first": (ms / base_ms) if ms and base_ms else None})
    del graphs, state, model
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba:1.4b")
    parser.add_argument("--batch", default="64,128")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--state-dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--variants", default="off,own,early,split,early+evict_first,split+evict_first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_prefetch: needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.state_dtype]
    rows = []
    print(f"{args.model}, context {args.context}, state {args.state_dtype}, {args.rounds} rounds of {REPLAYS} "
          f"replays\n| batch | variant | step ms (median) | vs the first | rounds |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        for row in run_batch(args.model, batch, args.context, dtype, variants, args.rounds):
            rows.append(row)
            ms = "n/a" if row["step_ms"] is None else f"{row['step_ms']:.3f}"
            ratio = "n/a" if row["vs_first"] is None else f"{row['vs_first']:.3f}"
            print(f"| {batch} | {row['variant']} | {ms} | {ratio} | "
                  f"{', '.join(f'{t:.3f}' for t in row['rounds_ms'])} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
