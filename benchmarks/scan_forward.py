"""Selective-scan forward settings (TUNING overrides) at the Mamba-1.4B layer, on a GPU: lanes per channel
(fwd_parts), the time split (SPLIT_T) and how it finds its segments' end states (segment_states).

    python3 benchmarks/scan_forward.py --out OUT [--shapes 1x65536,1x16384,2x8192,8x2048]
        [--settings '[{}, {"segment_states": "scan"}, {"fwd_parts": 8}, ...]']
        [--reference '{"segment_states": "scan"}'] [--rounds 2] [--dt benchmark,mamba-init] [--warm-only | --once]
    ncu --kernel-name regex:_scan_fwd_parts_kernel --launch-skip 1 --launch-count 1 --section WarpStateStats \
        python3 benchmarks/scan_forward.py --once --settings '[{"fwd_parts": 8}]' --shapes 1x65536

Per shape and setting ({} is the default): the forward (no autograd) against the reference setting, relative error
of y and the final state (NaN never passes), then median CUDA-event times in interleaved rounds, with the exp floor
of kernels.py (exps / measured special-function rate); and forward+backward for the first two settings (the backward
is the same kernel either way: it reads the forward's checkpoints). Writes OUT/scan_forward.json and a markdown
table to stdout. --warm-only compiles the settings' kernels and times nothing (run one process per setting in
parallel first: compiling is single-threaded). --dt: the step sizes and decays drawn (kernels.SCAN_DT; each a row
group of its own): the segment sums stop early only where every state of a warp's channels has decayed to nothing,
which the benchmark's steps reach within ~700 steps and a freshly initialised Mamba layer's slowest channels (dt
0.001, A = -1) do not within a segment. --once: each setting's forward twice at the first shape (compile,
then the call to profile), nothing timed or checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: E402

DIM, N = 4096, 16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default="1x65536,1x16384,2x8192,8x2048")
    p.add_argument("--settings", default='[{}, {"segment_states": "scan"}, {"fwd_parts": 8}]')
    p.add_argument("--reference", default='{"segment_states": "scan"}')
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dt", default="benchmark", help="comma-separated, from " + ", ".join(kernels.SCAN_DT))
    p.add_argument("--warm-only", action="store_true")
    p.add_argument("--once", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/scan_forward.py needs a CUDA device", file=sys.stderr)
        return 2
    from seqlab.ops.triton import selective_scan as tss

    shapes = [kernels.parse_shape(s) for s in args.shapes.split(",")]
    dts = args.dt.split(",")
    for dt in dts:
        if dt not in kernels.SCAN_DT:
            p.error(f"--dt: expected names from {', '.join(kernels.SCAN_DT)}, got {dt!r}")
    settings = [json.dumps(t) for t in kernels.parse_tuning_list(args.settings)]
    kernels.WARM_ONLY = args.warm_only
    c = kernels.measure_ceilings() if not args.warm_only else None
    rows = []

    def run_with(setting, ins):
        tss.TUNING.clear()
        tss.TUNING.update(json.loads(setting))
        try:
            return tss.selective_scan_triton(*ins, True, None, None)
        finally:
            tss.TUNING.clear()

    if args.once:
        ins = kernels.scan_inputs(*shapes[0], DIM, N)
        with torch.no_grad():
            for s in settings:
                for _ in range(2):
                    run_with(s, ins)
                    torch.cuda.synchronize()
        return 0
    for (batch, seqlen), dt in [(shape, dt) for dt in dts for shape in shapes]:
        shape = f"{batch}x{seqlen}"
        torch.manual_seed(0)
        ins = kernels.scan_inputs(batch, seqlen, DIM, N, dt=dt)
        floor = None if c is None else kernels.scan_floor(c, batch, seqlen, DIM, N, False)
        with torch.no_grad():
            ref_y, ref_h = run_with(args.reference, ins)
            checks = {}
            for s in settings:
                y, h = run_with(s, ins)
                checks[s] = (_rel(y, ref_y), _rel(h, ref_h))
            times = {s: [] for s in settings}
            for _ in range(max(1, args.rounds)):
                for s in settings:
                    times[s].append(kernels.cuda_time(lambda s=s, ins=ins: run_with(s, ins)))
        ins = None
        gins = kernels.scan_inputs(batch, seqlen, DIM, N, grad=True, dt=dt)
        fb = {}
        for s in settings[:2]:
            fb[s] = kernels.cuda_time(kernels.fwd_bwd(lambda s=s, g=gins: run_with(s, g)[0], gins))
        gins = None
        torch.cuda.empty_cache()
        for s in settings:
            tss.TUNING.clear()
            tss.TUNING.update(json.loads(s))
            chosen = tss._fwd_parts(DIM, N, 1)
            tss.TUNING.clear()
            ms = min(times[s])
            row = dict(shape=shape, dt=dt, setting=s, parts=chosen, fwd_ms=ms,
                       fwd_ms_rounds=times[s], rel_err_y=checks[s][0], rel_err_state=checks[s][1],
                       fwd_bwd_ms=fb.get(s))
            if floor is not None:
                row.update(floor_ms=floor[0], floor_bound=floor[1], x_floor=ms / floor[0])
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scan_forward.json"), "w") as f:
        json.dump(dict(ceilings=c, rows=rows), f, indent=1, default=str)
    if args.warm_only:
        return 0
    print("| shape | dt | setting | lanes/channel | fwd ms (rounds) | x exp floor | fwd+bwd ms | rel. err y / state |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = " / ".join(f"{t:.3f}" for t in r["fwd_ms_rounds"])
        fbs = f"{r['fwd_bwd_ms']:.3f}" if r["fwd_bwd_ms"] else "–"
        print(f"| {r['shape']} | {r['dt']} | `{r['setting']}` | {r['parts']} | {rounds} | {r['x_floor']:.2f} | {fbs} | "
              f"{r['rel_err_y']:.1e} / {r['rel_err_state']:.1e} |")
    bad = [r for r in rows if not (r["rel_err_y"] <= 1e-2 and r["rel_err_state"] <= 1e-3)]
    for r in bad:
        print(f"FAILED check: {r['shape']} {r['setting']}: rel. err y {r['rel_err_y']:.2e}, "
              f"state {r['rel_err_state']:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
