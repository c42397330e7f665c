"""The selective (Mamba-1) decode step kernel over program tiles, at a model's shape, as a decode step runs it.

    python3 benchmarks/decode_step_sweep.py [--batch 64,128] [--state-dtype bf16,fp32] [--fused] [--json FILE]

Each tile (batch rows per program, channels per program, warps; seqlab.ops.triton.decode.TUNING's step_rows,
step_block_d, step_warps) is checked against the default tile's output and state on the same inputs (equal within
float32 rounding), then timed in a CUDA graph that steps LAYERS separate states in turn (the states of the other
layers evict each one from L2, as in a model's step), median of 5 replays. Shown with the bandwidth of the state
read and written (2 x B x D x N x bytes per step) against the byte floor. Mamba 1.4b: D = 4096, N = 16, dt (B, D)
given (the dt projection as its own GEMM, the default), x, z, B, C as strided views of the projections' outputs.

--fused: instead, the dt projection and the step in one kernel (seqlab.ops.triton.mamba_step; rows, channels, states
per loop step and warps of its program tile) against the pair it replaces (the dt projection through
seqlab.ops.decode_linear, then the step kernel's default tile), each layer with its own copy of W_dt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode_gemm import graph_time_us  # noqa: E402
from seqlab.bench.roofline import measure_bandwidth  # noqa: E402

LAYERS = 48
TILES = [(rows, block_d, warps) for rows, block_d, warps in itertools.product((1, 2, 4), (32, 64, 128), (1, 2, 4))
         if block_d * 16 // (32 * warps) in (1, 2, 4, 8, 16, 32)]  # 1..32 states a thread


def _inputs(batch: int, dim: int, n: int, rank: int, state_dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(batch)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    xz = torch.randn(batch, 2 * dim, generator=gen, **bf16)
    x_dbl = torch.randn(batch, rank + 2 * n, generator=gen, **bf16)
    dt = torch.randn(batch, dim, generator=gen, **bf16)
    states = [torch.randn(batch, dim, n, generator=gen, device="cuda").to(state_dtype) for _ in range(LAYERS)]
    params = dict(A_log=torch.rand(dim, n, generator=gen, device="cuda").log1p(), D=torch.randn(dim, device="cuda"),
                  dt_bias=torch.randn(dim, device="cuda"))
    views = dict(x=xz[:, :dim], z=xz[:, dim:], B=x_dbl[:, rank:rank + n].unsqueeze(1),
                 C=x_dbl[:, rank + n:].unsqueeze(1), dt=dt)
    return states, views, params


def _step(state, views, params):
    from seqlab.ops.triton.decode import selective_state_update_triton

    return selective_state_update_triton(state, views["x"], views["dt"], params["A_log"], views["B"], views["C"],
                                         params["D"], views["z"], params["dt_bias"], True, A_is_log=True)


def sweep(batch: int, state_dtype: torch.dtype, bandwidth: float, dim: int = 4096, n: int = 16,
          rank: int = 128) -> list[dict]:
    from seqlab.ops.triton import decode

    states, views, params = _inputs(batch, dim, n, rank, state_dtype)
    saved = dict(decode.TUNING)
    start = states[0].clone()  # every tile's check starts here (the timing steps the states in place)
    state_ref = start.clone()
    y_ref = _step(state_ref, views, params)
    floor_us = 2 * batch * dim * n * state_dtype.itemsize / bandwidth * 1e6
    rows = []
    try:
        for tile in [None, *TILES]:
            for key, value in zip(("step_rows", "step_block_d", "step_warps"), tile or (None, None, None)):
                decode.TUNING[key] = value
            probe = start.clone()
            try:
                y = _step(probe, views, params)
            except Exception as exc:  # a tile the compiler refuses
                rows.append(dict(tile=tile, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            err = max(((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item(),
                      ((probe.float() - state_ref.float()).norm() / state_ref.float().norm()).item())
            us = graph_time_us(lambda: [_step(s, views, params) for s in states], calls=1) / LAYERS
            rows.append(dict(tile=tile or "default", us=us, floor_us=floor_us, of_floor=us / floor_us,
                             rel_err=err, ok=err <= 1e-2))
    finally:
        decode.TUNING.clear()
        decode.TUNING.update(saved)
    return rows


FUSED_TILES = [dict(BLOCK_B=b, BLOCK_D=d, BLOCK_N=n, WARPS=w)
               for b, d, n, w in itertools.product((16, 32, 64), (16, 32, 64), (4, 8, 16), (1, 2, 4, 8))
               if b * d * n // (32 * w) in (8, 16, 32, 64, 128)]  # 8..128 states a thread per loop step


def sweep_fused(batch: int, state_dtype: torch.dtype, bandwidth: float, dim: int = 4096, n: int = 16,
                rank: int = 128, tiles: list[dict] | None = None, time_it: bool = True) -> list[dict]:
    """Rows of the fused dt_proj + step kernel's tiles (and the unfused pair, tile "unfused") at one batch size.
    ``tiles``: a subset of FUSED_TILES; without ``time_it`` only compiled and checked (a warm-up process)."""
    from seqlab.ops.decode_linear import decode_linear
    from seqlab.ops.triton.mamba_step import selective_step_dt_proj_triton

    states, views, params = _inputs(batch, dim, n, rank, state_dtype)
    gen = torch.Generator(device="cuda").manual_seed(batch + 1)
    weights = [torch.randn(dim, rank, generator=gen, device="cuda", dtype=torch.bfloat16) * rank ** -0.5
               for _ in range(LAYERS)]
    dt_low = torch.randn(batch, rank + 2 * n, generator=gen, device="cuda", dtype=torch.bfloat16)[:, :rank]

    def unfused(state, w):
        views_dt = dict(views, dt=decode_linear(dt_low, w))
        return _step(state, views_dt, params)

    def fused(state, w, cfg):
        return selective_step_dt_proj_triton(state, views["x"], dt_low, w, params["dt_bias"], params["A_log"],
                                             views["B"][:, 0], views["C"][:, 0], params["D"], views["z"], config=cfg)

    start = states[0].clone()
    state_ref = start.clone()
    y_ref = unfused(state_ref, weights[0])
    floor_us = (2 * batch * dim * n * state_dtype.itemsize + dim * rank * 2) / bandwidth * 1e6
    rows = []
    for cfg in [None, *(FUSED_TILES if tiles is None else tiles)]:
        probe = start.clone()
        try:
            y = unfused(probe, weights[0]) if cfg is None else fused(probe, weights[0], cfg)
        except Exception as exc:  # a tile the compiler refuses
            rows.append(dict(tile=cfg, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        err = max(((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item(),
                  ((probe.float() - state_ref.float()).norm() / state_ref.float().norm()).item())
        if not time_it:
            rows.append(dict(tile=cfg or "unfused", rel_err=err, ok=err <= 1e-2))
            continue
        if cfg is None:
            calls = lambda: [unfused(s, w) for s, w in zip(states, weights)]  # noqa: E731
        else:
            calls = lambda cfg=cfg: [fused(s, w, cfg) for s, w in zip(states, weights)]  # noqa: E731
        us = graph_time_us(calls, calls=1) / LAYERS
        rows.append(dict(tile=cfg or "unfused", us=us, floor_us=floor_us, of_floor=us / floor_us, rel_err=err,
                         ok=err <= 1e-2))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="64,128")
    parser.add_argument("--state-dtype", default="bf16,fp32")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--fused", action="store_true", help="the fused dt_proj + step kernel's tiles")
    parser.add_argument("--warm", default="", metavar="I/K",
                        help="with --fused: only compile and check every K-th fused tile from the I-th (one of K "
                             "warm-up processes run before the timing one; the compiled kernels are cached)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_step_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if args.warm:
        first, every = (int(v) for v in args.warm.split("/"))
        for name in args.state_dtype.split(","):
            rows = sweep_fused(64, dtypes[name], 1.0, tiles=FUSED_TILES[first::every], time_it=False)
            print(f"warm {args.warm} {name}: {sum(r.get('ok', False) for r in rows)} of {len(rows)} checked")
        return 0
    bandwidth = measure_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    results = []
    for batch, name in itertools.product([int(b) for b in args.batch.split(",")], args.state_dtype.split(",")):
        rows = (sweep_fused if args.fused else sweep)(batch, dtypes[name], bandwidth)
        for row in rows:
            row.update(batch=batch, state_dtype=name)
        results += rows
        timed = sorted((r for r in rows if "us" in r and r["ok"]), key=lambda r: r["us"])
        baseline = "unfused" if args.fused else "default"
        default = next(r for r in rows if r["tile"] == baseline)
        print(f"\n## batch {batch}, state {name}: {baseline} {default['us']:.2f} us per layer "
              f"({default['of_floor']:.2f}x the byte floor {default['floor_us']:.2f} us)")
        header = "fused tile" if args.fused else "tile (rows, block_d, warps)"
        print(f"| {header} | us per layer | x floor | rel err |\n|---|---|---|---|")
        for r in timed[: args.top]:
            print(f"| {r['tile']} | {r['us']:.2f} | {r['of_floor']:.2f} | {r['rel_err']:.1e} |")
        bad = [r for r in rows if not r.get("ok", False)]
        if bad:
            print(f"refused or wrong: {[(r['tile'], r.get('error') or r.get('rel_err')) for r in bad]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
