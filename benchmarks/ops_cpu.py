"""CPU timings of every op: the sequential ``ref`` loop against the parallel ``torch`` path and ``auto``'s choice.

    python benchmarks/ops_cpu.py [--quick] [--json results.json] [--threads 2]

Prints one table row per (op, size): median wall time of each path (forward only, no autograd), the speed-up of
``torch`` over ``ref``, and what ``backend="auto"`` costs — which must never be slower than the loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from seqlab import ops


def median_seconds(fn: Callable[[], object], repeats: int, min_time: float = 0.2) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def selective_scan_case(b: int, l: int, d: int, n: int):
    u, delta, z = torch.randn(b, l, d), torch.randn(b, l, d) * 0.5, torch.randn(b, l, d)
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, l, n), torch.randn(b, l, n)
    D, bias = torch.randn(d), torch.randn(d) * 0.1
    label = f"B={b} L={l} D={d} N={n}"
    return label, lambda backend: ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, backend=backend)


def ssd_case(b: int, l: int, h: int, p: int, n: int):
    x, dt = torch.randn(b, l, h, p), torch.randn(b, l, h)
    A = -torch.rand(h) - 0.5
    B, C = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    D, bias = torch.randn(h), torch.randn(h) * 0.1
    label = f"B={b} L={l} H={h} P={p} N={n}"
    return label, lambda backend: ops.ssd(x, dt, A, B, C, chunk_size=64, D=D, dt_bias=bias, backend=backend)


def conv_case(b: int, l: int, d: int, w: int):
    x, weight, bias = torch.randn(b, l, d), torch.randn(d, w), torch.randn(d)
    label = f"B={b} L={l} D={d} W={w}"
    return label, lambda backend: ops.causal_conv1d(x, weight, bias, activation="silu", backend=backend)


def s4_case(b: int, l: int, h: int, n: int):
    A = ops.s4d_init(n, "lin", H=h)
    C = torch.randn(h, n // 2, dtype=torch.complex64)
    log_dt = torch.full((h,), -3.0)
    u, D = torch.randn(b, l, h), torch.randn(h)

    def run(backend: str):
        k = ops.s4d_kernel(log_dt, A, C, l, backend=backend)
        return ops.fft_conv(u, k, D, backend=backend)

    return f"B={b} L={l} H={h} N={n}", run


def cases(quick: bool):
    scan = [(1, 256, 64, 16), (2, 1024, 256, 16), (2, 2048, 1536, 16)]
    ssd = [(1, 256, 4, 32, 32), (2, 2048, 8, 64, 64)]
    conv = [(2, 1024, 256, 4), (2, 2048, 1536, 4)]
    s4 = [(2, 1024, 64, 64), (2, 4096, 128, 64)]
    if quick:
        scan, ssd, conv, s4 = scan[:2], ssd[:1], conv[:1], s4[:1]
    yield from (("selective_scan", *selective_scan_case(*s)) for s in scan)
    yield from (("ssd", *ssd_case(*s)) for s in ssd)
    yield from (("causal_conv1d", *conv_case(*s)) for s in conv)
    yield from (("s4d_kernel+fft_conv", *s4_case(*s)) for s in s4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    columns = ("ref ms", "torch ms", "auto ms", "torch/ref")
    header = f"{'op':<20} {'size':<28} " + " ".join(f"{c:>10}" for c in columns) + f" {'auto/ref':>9}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for op, label, run in cases(args.quick):
            t = {b: median_seconds(lambda b=b, run=run: run(b), args.repeats) for b in ("ref", "torch", "auto")}
            row = {"op": op, "size": label, **{f"{b}_ms": 1e3 * s for b, s in t.items()}}
            row["speedup_torch_vs_ref"] = t["ref"] / t["torch"]
            row["auto_over_ref"] = t["auto"] / t["ref"]
            rows.append(row)
            print(
                f"{op:<20} {label:<28} {row['ref_ms']:>10.2f} {row['torch_ms']:>10.2f} {row['auto_ms']:>10.2f}"
                f" {row['speedup_torch_vs_ref']:>9.1f}x {row['auto_over_ref']:>8.2f}x"
            )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\n{meta}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
