"""Mamba-1.4B's decode GEMMs as a decode step runs them, weights streamed from memory (seqlab.ops.decode_linear's
cold copies) inside CUDA graphs: cuBLAS (after the RMSNorm kernel and before the conv-step kernel for in_proj; the
residual added for out_proj) against the small-batch Triton GEMM with the norm, conv and residual fused, over its
candidate tile shapes and wider ones (BLOCK_N 128 and 256).

    python3 benchmarks/decode_gemm_tiles.py [ROWS ...] [--breakdown]   # rows default 64; --breakdown: only the
                                                                       # in_proj variants without the norm weight
    ncu --kernel-name regex:small_batch --launch-skip 4 --launch-count 2 python3 benchmarks/decode_gemm_tiles.py --once
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from seqlab.ops._graph_timing import cold_copies, graph_time_ms
from seqlab.ops.conv import conv_step
from seqlab.ops.triton import small_batch_linear as sbl

CALLS = 3  # calls of each timed function per CUDA graph (graph_time_ms times the graph)
dev = torch.device("cuda") if torch.cuda.is_available() else None
WIDER = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=st, WARPS=w) for bn, bk, sk, st, w in [
    (256, 64, 1, 3, 8), (256, 64, 2, 3, 8), (256, 64, 4, 3, 8), (256, 64, 2, 2, 8), (256, 128, 2, 2, 8),
    (128, 64, 2, 4, 4), (128, 64, 4, 4, 4), (128, 64, 2, 4, 8), (128, 128, 2, 3, 8), (128, 64, 1, 4, 8),
    (64, 64, 4, 4, 4), (64, 64, 2, 6, 4)]]


def probe(rows: int, name: str, n: int, k: int, norm: bool, conv_c: int, residual: bool, norm_weight: bool = True,
          wider: bool = True) -> None:
    """Print cuBLAS's and every tile shape's microseconds per call, then the best tile shape. norm_weight=False:
    the weightless norm (its weight folded into x or W beforehand); wider: also the WIDER tile shapes."""
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    x = torch.randn(rows, k, **bf16)
    w = torch.randn(n, k, **bf16) / k**0.5
    g = (1 + 0.1 * torch.randn(k, device=dev)).bfloat16() if norm and norm_weight else None
    res = torch.randn(rows, n, **bf16) if residual else None
    conv = None
    if conv_c:  # state (rows, C, W - 1), weight (C, W), bias (C,) with W = 4
        conv = (torch.randn(rows, conv_c, 3, **bf16), torch.randn(conv_c, 4, **bf16), torch.randn(conv_c, **bf16))
    weights = cold_copies(w)

    def cublas():
        for wc in weights:
            xi = F.rms_norm(x, (k,), g, 1e-5) if norm else x
            out = torch.addmm(res, xi, wc.t()) if residual else xi @ wc.t()
            if conv:
                conv_step(conv[0], out[:, :conv_c], conv[1], conv[2], activation="silu")

    def per_call_us(fn) -> float:
        return graph_time_ms(fn, calls=CALLS) / (CALLS * len(weights)) * 1e3

    def gbs(us: float) -> float:
        return n * k * 2 / us / 1e3

    t_cublas = per_call_us(cublas)
    extras = (" + norm" + ("" if norm_weight else " (no weight)") if norm else "") + (" + conv" if conv else "")
    print(f"{name}: {rows}x{n}x{k} cuBLAS{extras}: {t_cublas:.2f} us ({gbs(t_cublas):.0f} GB/s)", flush=True)
    timed = []
    for cfg in sbl.candidate_configs(rows, n, k) + (WIDER if wider else []):
        def fused(cfg=cfg):
            for wc in weights:
                sbl.small_batch_linear_triton(x, wc, res, cfg, normalize=norm, norm_weight=g, norm_eps=1e-5,
                                              conv=conv)
        begin = time.time()
        try:
            t = per_call_us(fused)
        except Exception as e:  # a tile the compiler refuses
            print(f"   {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
            continue
        timed.append((t, cfg))
        print(f"   {t:7.2f} us {gbs(t):5.0f} GB/s  {cfg}  ({time.time() - begin:.0f} s)", flush=True)
    t, cfg = min(timed, key=lambda r: r[0])
    print(f"{name}: best Triton {t:.2f} us against cuBLAS{extras} {t_cublas:.2f} us: {t_cublas / t:.2f}x  {cfg}\n",
          flush=True)


def calls_for_a_profiler(rows: int) -> None:
    """in_proj (BLOCK_N 32, no split) without and with the conv epilogue, three calls each, nothing timed: for
    ``ncu --kernel-name regex:small_batch --launch-skip 4 --launch-count 2``."""
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    x, w = torch.randn(rows, 2048, **bf16), torch.randn(8192, 2048, **bf16) / 2048**0.5
    conv = (torch.randn(rows, 4096, 3, **bf16), torch.randn(4096, 4, **bf16), torch.randn(4096, **bf16))
    cfg = dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, STAGES=4, WARPS=4)
    for _ in range(3):
        sbl.small_batch_linear_triton(x, w, None, cfg)
        sbl.small_batch_linear_triton(x, w, None, cfg, conv=conv)
    torch.cuda.synchronize()


def main() -> None:
    args = sys.argv[1:]
    flags = ("--breakdown", "--once")
    bad = [a for a in args if a not in flags and not (a.isdigit() and 0 < int(a) <= sbl.MAX_ROWS)]
    if bad:
        raise SystemExit(f"decode_gemm_tiles.py: expected row counts from 1 to {sbl.MAX_ROWS}, --breakdown and "
                         f"--once, got {' '.join(bad)}")
    if not torch.cuda.is_available():
        raise SystemExit("decode_gemm_tiles.py: needs a CUDA GPU (it times CUDA graphs of the decode GEMMs)")
    breakdown_only = "--breakdown" in args
    torch.manual_seed(0)
    all_rows = [int(a) for a in args if a not in flags] or [64]
    if "--once" in args:
        for rows in all_rows:
            calls_for_a_profiler(rows)
        return
    for rows in all_rows:
        if not breakdown_only:
            probe(rows, "in_proj", 8192, 2048, True, 4096, False)
            probe(rows, "out_proj", 2048, 4096, False, 0, True)
        # where the fused in_proj's time goes: the GEMM alone, with the conv, with a weightless norm and the conv
        probe(rows, "in_proj", 8192, 2048, False, 0, False, wider=False)
        probe(rows, "in_proj", 8192, 2048, False, 4096, False, wider=False)
        probe(rows, "in_proj", 8192, 2048, True, 4096, False, norm_weight=False, wider=False)


if __name__ == "__main__":
    main()

