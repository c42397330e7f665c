"""Where a decode step's GPU time goes: kernels of one eager step of a preset, summed by name (torch.profiler).

    python3 benchmarks/decode_profile.py --models mamba:1.4b,transformer:1.3b --batch 64 --context 2048
    python3 benchmarks/decode_profile.py --models mamba:1.4b --state-dtype fp32,bf16 --dt-rows 0,4 --gemm auto,torch

Prints, per model, the step's kernels sorted by device time (count per step, microseconds per step, share) and the
total next to the wall time of a CUDA-graph replay of the same step; the gap between the two is launch and
scheduling overhead inside the graph. Random weights in bf16 (the generation benchmark's setting). The variant
options run every combination: the recurrent states' dtype, Mamba's dt projection as its own GEMM (0) or inside
the step kernel with n batch rows per program, the decode GEMMs' kernel (auto: timed per shape; torch: cuBLAS), and
the fused decode kernels (pre-norm folded into the input GEMM, Mamba's two fused step kernels) or the unfused ops,
the L2 prefetch schedule of the decode step's weights, and the L2 eviction policy of the selective step's state.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlab.generation import DecodeGraph  # noqa: E402
from seqlab.models.presets import from_preset  # noqa: E402

STEPS = 5
DEFAULT_KERNELS = None  # seqlab.mixers.base.FUSED_DECODE_KERNELS as imported (set in main)


def profile_model(spec: str, batch: int, context: int, state_dtype: torch.dtype = torch.float32) -> dict:
    name, size = spec.split(":")
    torch.manual_seed(0)
    model = from_preset(name, size).to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    state = model.allocate_state(batch, context + STEPS + 8, device="cuda", dtype=torch.bfloat16,
                                 state_dtype=state_dtype)
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
    parser.add_argument("--state-dtype", default="fp32", help="comma list of fp32, bf16")
    parser.add_argument("--dt-rows", default="0", help="comma list: Mamba's dt projection (0 = own GEMM)")
    parser.add_argument("--gemm", default="auto", help="comma list of auto, torch, triton (SEQLAB_DECODE_GEMM)")
    parser.add_argument("--fuse", default="default",
                        help="comma list: default (seqlab.mixers.base's settings), none (unfused ops), all (every "
                             "fused decode kernel of seqlab.ops.mamba_step on)")
    parser.add_argument("--pdl", default="0",
                        help="comma list: 1 = the decode kernels launch with programmatic dependent launch "
                             "(seqlab.ops.triton.PDL), 0 = without")
    parser.add_argument("--prefetch", default="off",
                        help="comma list of L2 prefetch schedules (seqlab.mixers.base.DECODE_PREFETCH): off, own, "
                             "early, split")
    parser.add_argument("--state-policy", default="normal",
                        help="comma list: normal, evict_first (the selective step's L2 policy for its state)")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    from seqlab.mixers import base
    from seqlab.ops.triton import PDL

    decode_linear = importlib.import_module("seqlab.ops.decode_linear")  # seqlab.ops binds the function's name
    global DEFAULT_KERNELS
    DEFAULT_KERNELS = dict(base.FUSED_DECODE_KERNELS)
    from seqlab.ops.triton import decode

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = []
    variants = itertools.product(args.models.split(","), args.state_dtype.split(","),
                                 [int(r) for r in args.dt_rows.split(",")], args.gemm.split(","),
                                 args.fuse.split(","), [p == "1" for p in args.pdl.split(",")],
                                 args.prefetch.split(","), args.state_policy.split(","))
    for spec, state_dtype, dt_rows, gemm, fuse, pdl, prefetch, policy in variants:
        PDL["enabled"] = pdl
        base.DECODE_PREFETCH["schedule"] = prefetch
        decode.TUNING["state_policy"] = "" if policy == "normal" else policy
        decode_linear._CHOICE.clear()  # each variant times its own GEMM choices
        decode_linear._CONFIG.clear()
        base.FUSE_DECODE = fuse != "none"
        for kernel in base.FUSED_DECODE_KERNELS:
            base.FUSED_DECODE_KERNELS[kernel] = fuse == "all" or (fuse == "default" and DEFAULT_KERNELS[kernel])
        decode.TUNING["dt_rows"] = dt_rows
        os.environ["SEQLAB_DECODE_GEMM"] = gemm
        result = profile_model(spec, args.batch, args.context, dtypes[state_dtype])
        result.update(state_dtype=state_dtype, dt_rows=dt_rows, gemm=gemm, fused=fuse, pdl=pdl, prefetch=prefetch,
                      state_policy=policy,
                      gemm_choices={str(k[1:4]): (v, decode_linear._CONFIG[k])
                                    for k, v in decode_linear._CHOICE.items()})
        results.append(result)
        graph = f"{result['graph_ms_per_step']:.3f} ms" if result["graph_ms_per_step"] is not None else "n/a"
        print(f"\n## {spec}, batch {args.batch}, context {args.context}, state {state_dtype}, dt_rows {dt_rows}, "
              f"gemm {gemm}, fused {fuse}, pdl {int(pdl)}, prefetch {prefetch}, state policy {policy}: "
              f"{result['kernels_per_step']:.0f} kernels, "
              f"{result['kernel_us_per_step'] / 1000:.3f} ms of kernel time per step; CUDA-graph step {graph}")
        if gemm == "auto":
            print(f"decode GEMM choices (rows, N, K): {result['gemm_choices']}")
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
