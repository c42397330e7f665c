"""The decode step's GEMMs: cuBLAS (torch.addmm, adding the residual as the step does) against the small-batch
Triton GEMM, at the Fig. 8 models' shapes; for the in-projections (a pre-norm before them) also the RMSNorm fused
into the GEMM (rows "+ rms_norm": rms_norm then addmm, two launches, against the one fused launch).

Each call is timed inside a CUDA graph of 20 calls (as a graphed decode step runs them), median of 5 replays, and
shown with the bandwidth it reaches streaming the weight (bytes of W / time). The Triton kernel is swept over
tile shapes; the best per shape is reported. Every tile shape is first checked on CHECK_CALLS back-to-back calls,
each on fresh inputs (a split-K reduction that reads a partial sum before it is visible then returns the previous
call's partials, so one call, or repeated calls on the same inputs, can hide it); a tile shape that fails any call
is reported and not timed.

    python3 benchmarks/decode_gemm.py [--rows 1,64,128] [--no-norm] [--json FILE]
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
    from seqlab.ops._graph_timing import graph_time_ms

    return graph_time_ms(fn, calls=calls, replays=replays, statistic=statistics.median) * 1e3 / calls


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
CHECK_CALLS = 8
NORMED = ("in_proj", "q_proj", "gate_proj")  # layers that follow a pre-norm: the fused-norm rows
EPS = 1e-5


def worst_error(run, inputs, refs) -> float:
    """The largest relative error of ``run(x, res)`` over back-to-back calls, one per input pair, checked after the
    last (so the calls queue as in a decode step)."""
    outs = [run(x, res) for x, res in inputs]
    return max(((out.float() - ref).norm() / ref.norm()).item() for out, ref in zip(outs, refs))


def sweep(label: str, m: int, n: int, k: int, norm: bool, dev: torch.device) -> dict:
    """Time cuBLAS and every Triton tile shape on one GEMM shape; the record of the fastest correct tile shape."""
    import torch.nn.functional as F

    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    g = (1 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16) if norm else None
    inputs = [(torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(m, n, device=dev, dtype=torch.bfloat16))
              for _ in range(CHECK_CALLS)]

    def normed(x):
        return F.rms_norm(x.float(), (k,), g.float(), EPS) if norm else x.float()

    refs = [torch.addmm(res.float(), normed(x), w.float().t()) for x, res in inputs]
    x, res = inputs[0]
    if norm:  # the unfused step: the norm's kernel, then the GEMM with the residual in its epilogue
        cublas = graph_time_us(lambda: torch.addmm(res, F.rms_norm(x, (k,), g, EPS), w.t()))
    else:
        cublas = graph_time_us(lambda: torch.addmm(res, x, w.t()))
    best, best_cfg = float("inf"), None
    for cfg in CONFIGS:
        def run(x, res, cfg=cfg):
            return small_batch_linear_triton(x, w, res, cfg, normalize=norm, norm_weight=g, norm_eps=EPS)
        try:
            err = worst_error(run, inputs, refs)
            if not err < 1e-2:
                print(f"  {label} M={m} {cfg}: relative error {err:.2e} (worst of {CHECK_CALLS} calls)")
                continue
            t = graph_time_us(lambda run=run: run(x, res))
        except Exception as e:  # a tile the compiler refuses: report and go on
            print(f"  {label} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if t < best:
            best, best_cfg = t, cfg
    nbytes = w.numel() * 2
    return dict(gemm=label, M=m, N=n, K=k, norm=norm, cublas_us=cublas, triton_us=best, config=best_cfg,
                cublas_gbs=nbytes / cublas / 1e3, triton_gbs=nbytes / best / 1e3 if best_cfg else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,64,128")
    parser.add_argument("--no-norm", action="store_true", help="leave out the fused-norm rows")
    parser.add_argument("--json")
    parser.add_argument("--time-limit", type=float, default=240.0, help="stop sweeping after this many seconds")
    args = parser.parse_args()

    start = time.time()
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    records = []
    print(f"{torch.cuda.get_device_name(dev)}, bf16, times per call in a CUDA graph\n")
    print(f"{'gemm':<40} {'M':>4} {'N':>6} {'K':>6} {'cublas us':>10} {'GB/s':>7} {'triton us':>10} {'GB/s':>7} "
          f"{'speed-up':>8}  best config")
    jobs = [(label, n, k, m, norm) for (label, (n, k)), m in itertools.product(model_shapes().items(), rows)
            for norm in (False, True) if not norm or (not args.no_norm and any(name in label for name in NORMED))]
    for label, n, k, m, norm in jobs:
        if time.time() - start > args.time_limit:
            print("time limit reached")
            break
        rec = sweep(label + (" + rms_norm" if norm else ""), m, n, k, norm, dev)
        records.append(rec)
        best = rec["triton_us"]
        print(f"{rec['gemm']:<40} {m:>4} {n:>6} {k:>6} {rec['cublas_us']:>10.2f} {rec['cublas_gbs']:>7.0f} "
              f"{best:>10.2f} {rec['triton_gbs'] or 0:>7.0f} {rec['cublas_us'] / best:>7.2f}x  {rec['config']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
