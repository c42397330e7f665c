"""The decode step's GEMMs: cuBLAS (torch.addmm, adding the residual as the step does) against the small-batch
Triton GEMM, at the Fig. 8 models' shapes.

Each call is timed inside a CUDA graph of 20 calls (as a graphed decode step runs them), median of 5 replays, and
shown with the bandwidth it reaches streaming the weight (bytes of W / time). The Triton kernel is swept over
tile shapes; the best per shape is reported.

    python3 benchmarks/decode_gemm.py [--rows 1,64,128] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch


def graph_time_us(fn, calls: int = 20, replays: int = 5) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def model_shapes() -> dict[str, tuple[int, int]]:
    """Distinct (N, K) of the decode GEMMs of the Fig. 8 models (built on the meta device)."""
    from seqlab.models.presets import from_preset

    labels: dict[tuple[int, int], list[str]] = {}
    for name, size in (("mamba", "1.4b"), ("transformer", "1.3b"), ("mamba2", "1.3b")):
        with torch.device("meta"):
            model = from_preset(name, size)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in mod_name:
                label = f"{name} {mod_name.split('.')[-1]}"
                names = labels.setdefault((mod.out_features, mod.in_features), [])
                if label not in names:
                    names.append(label)
    return {"/".join(names): shape for shape, names in labels.items()}


CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=4, WARPS=4)
           for bn, bk, sk in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,64,128")
    parser.add_argument("--json")
    parser.add_argument("--time-limit", type=float, default=240.0, help="stop sweeping after this many seconds")
    args = parser.parse_args()
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    start = time.time()
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    records = []
    print(f"{torch.cuda.get_device_name(dev)}, bf16, times per call in a CUDA graph\n")
    print(f"{'gemm':<40} {'M':>4} {'N':>6} {'K':>6} {'cublas us':>10} {'GB/s':>7} {'triton us':>10} {'GB/s':>7} "
          f"{'speed-up':>8}  best config")
    for (label, (n, k)), m in itertools.product(model_shapes().items(), rows):
        if time.time() - start > args.time_limit:
            print("time limit reached")
            break
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        res = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        ref = torch.addmm(res, x, w.t())
        cublas = graph_time_us(lambda x=x, w=w, res=res: torch.addmm(res, x, w.t()))
        best, best_cfg = float("inf"), None
        for cfg in CONFIGS:
            try:
                out = small_batch_linear_triton(x, w, res, cfg)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    print(f"  {label} M={m} {cfg}: relative error {err:.2e}")
                    continue
                t = graph_time_us(lambda x=x, w=w, res=res, cfg=cfg: small_batch_linear_triton(x, w, res, cfg))
            except Exception as e:  # a tile the compiler refuses: report and go on
                print(f"  {label} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            if t < best:
                best, best_cfg = t, cfg
        nbytes = w.numel() * 2
        rec = dict(gemm=label, M=m, N=n, K=k, cublas_us=cublas, triton_us=best, config=best_cfg,
                   cublas_gbs=nbytes / cublas / 1e3, triton_gbs=nbytes / best / 1e3 if best_cfg else None)
        records.append(rec)
        print(f"{label:<40} {m:>4} {n:>6} {k:>6} {cublas:>10.2f} {rec['cublas_gbs']:>7.0f} {best:>10.2f} "
              f"{rec['triton_gbs'] or 0:>7.0f} {cublas / best:>7.2f}x  {best_cfg}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
