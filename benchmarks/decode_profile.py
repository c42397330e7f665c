"""Where a decode step's GPU time goes: kernels of one eager step of a preset, summed by name (torch.profiler).

    python3 benchmarks/decode_profile.py --models mamba:1.4b,transformer:1.3b --batch 64 --context 2048

Prints, per model, the step's kernels sorted by device time (count per step, microseconds per step, share) and the
total next to the wall time of a CUDA-graph replay of the same step; the gap between the two is launch and
scheduling overhead inside the graph. Random weights in bf16 (the generation benchmark's setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlab.generation import DecodeGraph  # noqa: E402
from seqlab.models.presets import from_preset  # noqa: E402

STEPS = 5


def profile_model(spec: str, batch: int, context: int) -> dict:
    name, size = spec.split(":")
    torch.manual_seed(0)
    model = from_preset(name, size).to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    state = model.allocate_state(batch, context + STEPS + 8, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    token = torch.randint(0, vocab, (batch,), device="cuda")
    with torch.inference_mode():
        model(prompt, state=state)
        for _ in range(2):  # warm-up (kernel compilation)
            model(token[:, None], state=state)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(STEPS):
                model(token[:, None], state=state)
            torch.cuda.synchronize()
        per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name][0] += 1
                per_kernel[event.name][1] += event.device_time_total
        graph = DecodeGraph.record(model, state, token, vocab)
        graph_ms = None
        if graph is not None:
            for _ in range(3):
                graph.step(token)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.step(token)
            end.record()
            torch.cuda.synchronize()
            graph_ms = start.elapsed_time(end) / 20
    rows = sorted(({"kernel": k, "per_step": c / STEPS, "us_per_step": t / STEPS} for k, (c, t) in per_kernel.items()),
                  key=lambda r: -r["us_per_step"])  # fmt: skip
    total_us = sum(r["us_per_step"] for r in rows)
    return {"model": spec, "batch": batch, "context": context, "kernels_per_step": sum(r["per_step"] for r in rows),
            "kernel_us_per_step": total_us, "graph_ms_per_step": graph_ms, "rows": rows}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mamba:1.4b,mamba2:1.3b,transformer:1.3b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for spec in args.models.split(","):
        result = profile_model(spec, args.batch, args.context)
        results.append(result)
        graph = f"{result['graph_ms_per_step']:.3f} ms" if result["graph_ms_per_step"] is not None else "n/a"
        print(f"\n## {spec}, batch {args.batch}, context {args.context}: {result['kernels_per_step']:.0f} kernels, "
              f"{result['kernel_us_per_step'] / 1000:.3f} ms of kernel time per step; CUDA-graph step {graph}")
        print("| kernel | per step | us per step | share |\n|---|---|---|---|")
        for row in result["rows"][: args.top]:
            share = row["us_per_step"] / max(result["kernel_us_per_step"], 1e-9)
            print(f"| {row['kernel'][:90]} | {row['per_step']:.0f} | {row['us_per_step']:.1f} | {share:.1%} |")
        del result
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
