"""Does a bulk L2 prefetch make a decode GEMM read L2? One GEMM shape, four ways, each a CUDA graph of many calls.

    python3 benchmarks/l2_prefetch_probe.py --rows 64 --shapes 2048x4096,8192x2048 --gap-us 20

For a weight W (N, K) and x (rows, K) in bf16, per call of ``x Wᵀ`` (cuBLAS, and seqlab.ops.decode_linear's
choice) over copies of W that together exceed twice the L2:

    cold        the GEMM on the next copy (its weight comes from HBM)
    hot         the GEMM on one copy over and over (its weight stays in L2)
    gap         a GPU spin of --gap-us, then the GEMM on the next copy
    prefetch    the L2 prefetch of the next copy (seqlab.ops.prefetch), the spin, then the GEMM

"prefetch - gap" against "hot - cold" says how much of what an L2-resident weight saves the prefetch delivers,
and the prefetch's own cost shows in it too. Microseconds per call, medians of --rounds graph replays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlab.ops._graph_timing import graph_time_ms  # noqa: E402
from seqlab.ops.decode_linear import decode_linear  # noqa: E402
from seqlab.ops.prefetch import prefetch_l2  # noqa: E402


def spin_cycles(us: float) -> int:
    clock_khz = torch.cuda.get_device_properties(0).clock_rate  # kHz
    return int(us * clock_khz / 1000)


def graph_us(body, calls: int, rounds: int) -> float:
    """Microseconds per call of body(i) for i in range(calls), recorded once as a CUDA graph: the median of
    ``rounds`` replays."""
    def all_calls():
        for i in range(calls):
            body(i)

    return graph_time_ms(all_calls, calls=1, replays=rounds, statistic=statistics.median) * 1000 / calls


def probe(rows: int, n: int, k: int, gap_us: float, rounds: int) -> list[dict]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    weight_bytes = n * k * 2
    copies = max(4, -(-2 * l2 // weight_bytes) + 1)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    cycles = spin_cycles(gap_us)
    calls = 4 * copies
    out = []
    kernels = {"cublas": lambda w: torch.mm(x, w.t()), "seqlab": lambda w: decode_linear(x, w)}
    for name, gemm in kernels.items():
        with torch.inference_mode():
            gemm(weights[0])  # seqlab: times its kernel choice once, outside the graphs
            ways = {
                "cold": lambda i, gemm=gemm: gemm(weights[i % copies]),
                "hot": lambda i, gemm=gemm: gemm(weights[0]),
                "gap": lambda i, gemm=gemm: (torch.cuda._sleep(cycles), gemm(weights[i % copies])),
                "prefetch": lambda i, gemm=gemm: (prefetch_l2(weights[i % copies]), torch.cuda._sleep(cycles),
                                                  gemm(weights[i % copies])),
                "spin": lambda i: torch.cuda._sleep(cycles),
            }
            us = {way: graph_us(body, calls, rounds) for way, body in ways.items()}
        row = {"rows": rows, "N": n, "K": k, "kernel": name, "weight_MB": weight_bytes / 1e6, "copies": copies, **us}
        out.append(row)
        print(f"| {rows} | {n}x{k} | {name} | {us['cold']:.2f} | {us['hot']:.2f} | {us['gap'] - us['spin']:.2f} | "
              f"{us['prefetch'] - us['spin']:.2f} | {us['spin']:.2f} |", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64")
    parser.add_argument("--shapes", default="2048x4096,8192x2048", help="comma list of NxK weight shapes")
    parser.add_argument("--gap-us", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("l2_prefetch_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, L2 {props.L2_cache_size / 2**20:.0f} MiB, spin {args.gap_us} us; microseconds per call "
          "(gap and prefetch: the spin's own time taken off)\n"
          "| rows | N x K | kernel | cold | hot | gap | prefetch | spin |\n|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            probe(rows, n, k, args.gap_us, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
