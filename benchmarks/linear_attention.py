"""Benchmark linear attention: the Triton kernels against the chunked torch path, forward and forward+backward.

    python benchmarks/linear_attention.py --out results/      # CUDA only; prints a table, writes linear_attention.json

Shapes: a 1.3B-class layer (d_model 2048, 16 heads of 128 for the linear Transformer / scalar decay; 32 heads of
64 for RWKV-6's per-channel decay with the bonus u), batch x seqlen from 8 x 2048 to 1 x 16384, bf16 inputs.
For each: median milliseconds (CUDA events), the bytes-moved floor (q, k, v, g, o read/written once at the
measured copy bandwidth) and the ratio torch / triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import cuda_time  # noqa: E402  (this folder's kernel benchmark: median ms by CUDA events)

SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]
KINDS = {  # name: (heads, head_dim, decay, bonus)
    "linear (no decay)": (16, 128, "none", False),
    "scalar decay": (16, 128, "head", False),
    "rwkv6 (channel decay + u)": (32, 64, "channel", True),
}


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x))
    return 2 * x.numel() / (ms / 1e3)


def inputs(batch, seqlen, heads, dim, decay, bonus):
    kw = {name: torch.randn(batch, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
          for name in ("q", "k", "v")}
    if decay != "none":
        shape = (batch, seqlen, heads) + ((dim,) if decay == "channel" else ())
        kw["g"] = (-torch.rand(shape, device="cuda") * 0.1).requires_grad_(True)
    if bonus:
        kw["u"] = torch.randn(heads, dim, device="cuda").requires_grad_(True)
    return kw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for linear_attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_attention benchmark: needs CUDA", file=sys.stderr)
        return 2
    from seqlab.ops.linear_attention import linear_attention

    bandwidth = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'kind':28s} {'shape':>12s} {'pass':>8s} {'triton ms':>10s} {'torch ms':>10s} {'torch/triton':>12s} "
          f"{'floor ms':>9s}")
    for kind, (heads, dim, decay, bonus) in KINDS.items():
        for batch, seqlen in SHAPES:
            kw = inputs(batch, seqlen, heads, dim, decay, bonus)
            nbytes = sum(t.numel() * t.element_size() for t in kw.values()) + kw["v"].numel() * 2  # + o
            for mode in ("fwd", "fwd+bwd"):
                times = {}
                for backend in ("triton", "torch"):
                    def run(backend=backend, mode=mode, kw=kw):
                        o = linear_attention(**kw, backend=backend)
                        if mode == "fwd+bwd":
                            o.float().sum().backward()
                    try:
                        times[backend] = cuda_time(run)
                    except torch.OutOfMemoryError:
                        times[backend] = None
                        torch.cuda.empty_cache()
                floor = nbytes * (3 if mode == "fwd+bwd" else 1) / bandwidth * 1e3
                ratio = times["torch"] / times["triton"] if times["torch"] and times["triton"] else None
                rows.append(dict(kind=kind, batch=batch, seqlen=seqlen, heads=heads, head_dim=dim, mode=mode,
                                 triton_ms=times["triton"], torch_ms=times["torch"], floor_ms=floor, ratio=ratio))
                fmt = lambda x: "oom" if x is None else f"{x:.3f}"  # noqa: E731
                print(f"{kind:28s} {f'{batch}x{seqlen}':>12s} {mode:>8s} {fmt(times['triton']):>10s} "
                      f"{fmt(times['torch']):>10s} {fmt(ratio):>12s} {floor:9.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "linear_attention.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
