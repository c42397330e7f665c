"""GPU check of the Triton kernels of the matrix-state families: linear attention (each decay kind), the delta rule
and their decode steps, against the torch paths, at real shapes, in float32 and bf16.

    python benchmarks/families_gpu.py --out results/families_gpu.json      # CUDA only; ~2 minutes on an H200

1. accuracy: forward and every gradient (loss = <o, w_o> + <S, w_S> with random weights), relative error
   ||triton - ref|| / ||ref|| per tensor; the reference is the torch (chunked) path in float32 on the same values
   (bf16 inputs upcast); NaN/inf never passes. Decode steps: 8 steps vs the torch step, then the Triton step
   captured in a CUDA graph and replayed must equal the eager Triton step.
2. speed: median CUDA-event milliseconds of triton and torch, forward and forward+backward; decode steps per call.
3. a small sweep of the delta-rule kernels' V-tile and warp count (forward, forward+backward; bf16), to pick
   seqlab.ops.triton.delta_rule.FWD_CONFIG / BWD_CONFIG.
Prints markdown tables, writes JSON to --out; exit status 1 when any accuracy check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)  # kernels.cuda_time

TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
LA_KINDS = {  # name: (decay kind, bonus u)
    "linear (no decay)": ("none", False),
    "scalar decay": ("head", False),
    "channel decay (GLA)": ("channel", False),
    "channel decay + u (RWKV-6)": ("channel", True),
}
DEV = "cuda"  # "cpu" only for the smoke run under TRITON_INTERPRET=1 (--smoke-cpu)
# settings of seqlab.ops.triton.delta_rule tried by the sweep: forwards timed alone, the backward as fwd + bwd
SETTINGS = ("CHUNKED_FORWARD", "FWD_CONFIG", "CHUNK_FWD_CONFIG", "CHUNK_DOT_PRECISION", "BWD_CONFIG")
SWEEP = [("fwd", dict(CHUNKED_FORWARD=False, FWD_CONFIG=c)) for c in ((16, 1), (16, 2), (32, 2), (32, 4), (64, 4))]
SWEEP += [("fwd", dict(CHUNKED_FORWARD=True, CHUNK_FWD_CONFIG=c, CHUNK_DOT_PRECISION=p))
          for c, p in (((16, 4), "tf32x3"), ((32, 4), "tf32x3"), ((64, 4), "tf32x3"), ((32, 8), "tf32x3"),
                       ((32, 4), "ieee"), ((32, 4), "tf32"))]
SWEEP += [("fwd+bwd", dict(BWD_CONFIG=c)) for c in ((16, 2), (16, 4), (32, 2), (32, 4), (64, 4))]


def rel(out, ref) -> float:
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else float("nan")
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def passes(errors: dict, tol: float) -> bool:
    return all(not math.isnan(e) and e <= tol for e in errors.values())  # inf and NaN fail


# --------------------------------------------------------------------------------------------------- inputs


def la_inputs(batch, seqlen, heads, dim, decay, bonus, gen):
    kw = {n: torch.randn(batch, seqlen, heads, dim, generator=gen, device=DEV) for n in ("q", "k", "v")}
    if decay != "none":
        shape = (batch, seqlen, heads) + ((dim,) if decay == "channel" else ())
        kw["g"] = F.logsigmoid(torch.randn(shape, generator=gen, device=DEV) + 3.0)  # decays in (0, 1), ~0.95
    if bonus:
        kw["u"] = torch.randn(heads, dim, generator=gen, device=DEV)
    kw["initial_state"] = torch.randn(batch, heads, dim, dim, generator=gen, device=DEV)
    return kw


def delta_inputs(batch, seqlen, heads, dim, gen, docs=False):
    kw = dict(q=torch.randn(batch, seqlen, heads, dim, generator=gen, device=DEV),
              k=F.normalize(torch.randn(batch, seqlen, heads, dim, generator=gen, device=DEV), dim=-1),
              v=torch.randn(batch, seqlen, heads, dim, generator=gen, device=DEV),
              beta=torch.sigmoid(torch.randn(batch, seqlen, heads, generator=gen, device=DEV)),
              g=F.logsigmoid(torch.randn(batch, seqlen, heads, generator=gen, device=DEV) + 3.0),
              initial_state=torch.randn(batch, heads, dim, dim, generator=gen, device=DEV))
    if docs:
        cuts = (torch.rand(batch, seqlen, generator=gen, device=DEV) < 8 / seqlen).long()  # ~8 documents a row
        kw["seq_idx"] = cuts.cumsum(1).to(torch.int32)
    return kw


def leaves_of(kw, dtype):
    """Fresh leaves: activations in ``dtype``, parameters-like tensors (g, u, beta, state) in float32."""
    out = {}
    for n, t in kw.items():
        if not t.is_floating_point():
            out[n] = t
        else:
            out[n] = (t.to(dtype) if n in ("q", "k", "v") else t.float()).detach().requires_grad_(True)
    return out


# ------------------------------------------------------------------------------------------------- checks


def check_op(op, kw, dtype, gen, **options):
    """Relative errors of triton vs the float32 torch path on the same values: o, final state, every gradient."""
    tri = leaves_of(kw, dtype)
    ref = {n: (t.detach().float().requires_grad_(True) if t.is_floating_point() else t) for n, t in tri.items()}
    o_r, S_r = op(**ref, **options, backend="torch", return_final_state=True)
    o_t, S_t = op(**tri, **options, backend="triton", return_final_state=True)
    w_o = torch.randn(o_r.shape, generator=gen, device=DEV)
    w_S = torch.randn(S_r.shape, generator=gen, device=DEV)
    ((o_r * w_o).sum() + (S_r * w_S).sum()).backward()
    ((o_t.float() * w_o).sum() + (S_t * w_S).sum()).backward()
    errors = {"o": rel(o_t, o_r), "final_state": rel(S_t, S_r)}
    errors.update({f"d{n}": rel(tri[n].grad, ref[n].grad) for n in tri if tri[n].is_floating_point()})
    return errors


def check_step(step, state, inputs, steps=8):
    """Triton step vs torch step over ``steps`` positions, then a CUDA-graph replay of the Triton step vs eager."""
    s_tri, s_ref = state.clone(), state.clone()
    errors = {"o": 0.0, "state": 0.0}
    for t in range(steps):
        args = [x if x is None or x.dim() < 3 else x[:, t] for x in inputs[0]]
        o_t = step(s_tri, *args, **inputs[1], backend="triton")
        o_r = step(s_ref, *args, **inputs[1], backend="torch")
        errors["o"] = max(errors["o"], rel(o_t, o_r))
        errors["state"] = max(errors["state"], rel(s_tri, s_ref))
    if DEV != "cuda":
        return errors
    args = [x if x is None or x.dim() < 3 else x[:, 0].clone() for x in inputs[0]]
    s_graph, s_eager = state.clone(), state.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        step(state.clone(), *args, **inputs[1], backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = step(s_graph, *args, **inputs[1], backend="triton")
    graph.replay()
    o_eager = step(s_eager, *args, **inputs[1], backend="triton")
    torch.cuda.synchronize()
    errors["graph_o"] = rel(o_graph, o_eager)
    errors["graph_state"] = rel(s_graph, s_eager)
    return errors


# ------------------------------------------------------------------------------------------------- timing


def time_op(op, kw, dtype, backend, mode, budget, **options):
    from kernels import cuda_time  # this folder's kernel benchmark: median ms by CUDA events

    leaves = leaves_of(kw, dtype)
    if mode == "fwd":
        leaves = {n: t.detach() for n, t in leaves.items()}

    def run():
        o = op(**leaves, **options, backend=backend)
        if mode == "fwd+bwd":
            o.float().sum().backward()
            for t in leaves.values():
                t.grad = None

    try:
        if mode == "fwd":
            with torch.no_grad():
                return cuda_time(run, max_seconds=budget)
        return cuda_time(run, max_seconds=budget)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def time_step(step, state, args, options, backend, budget):
    from kernels import cuda_time

    return cuda_time(lambda: step(state, *args, **options, backend=backend), max_seconds=budget)


# --------------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def kernel_settings(module, settings: dict):
    """Set module attributes (kernel configuration) for the duration of a block."""
    saved = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def guarded(fn, *args, **kwargs):
    """fn(...) or, when it raises, a short error string (a failing variant must not stop the check)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - recorded and reported
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def is_ms(x) -> bool:
    return isinstance(x, float) and x > 0


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="families_gpu.json", help="path of the JSON results")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64, help="K = V per head")
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--no-sweep", action="store_true", help="skip the delta-rule tile sweep")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="accuracy checks only, on the CPU under TRITON_INTERPRET=1 (use tiny shapes)")
    args = parser.parse_args(argv)
    global DEV
    DEV = "cpu" if args.smoke_cpu else "cuda"
    if args.smoke_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        print("families_gpu: --smoke-cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("families_gpu: needs CUDA (the CPU tests run these kernels under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from seqlab.ops.delta_rule import delta_rule, delta_rule_step
    from seqlab.ops.linear_attention import linear_attention, linear_attention_step
    from seqlab.ops.triton import delta_rule as dr

    start = time.perf_counter()
    B, L, H, D = args.batch, args.seqlen, args.heads, args.dim
    gen = torch.Generator(device=DEV).manual_seed(0)
    checks, timings, sweep = [], [], []
    device_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)"
    print(f"# families GPU check: {device_name}, B={B} L={L} H={H} K=V={D}\n")

    chunked, recurrent = {"CHUNKED_FORWARD": True}, {"CHUNKED_FORWARD": False}
    cases = [("linear_attention", kind, linear_attention, la_inputs(B, L, H, D, decay, bonus, gen), {})
             for kind, (decay, bonus) in LA_KINDS.items()]
    plain, docs = delta_inputs(B, L, H, D, gen), delta_inputs(B, L, H, D, gen, docs=True)
    cases += [("delta_rule", "gated + initial state, chunked fwd", delta_rule, plain, chunked),
              ("delta_rule", "gated + initial state, recurrent fwd", delta_rule, plain, recurrent),
              ("delta_rule", "gated + documents, chunked fwd", delta_rule, docs, chunked),
              ("delta_rule", "gated + documents, recurrent fwd", delta_rule, docs, recurrent)]

    def record(op_name, variant, dtype, errors):
        if not isinstance(errors, dict):  # the run raised: guarded() returned the message
            print(f"  {op_name} {variant} {dtype}: {errors}")
            errors = {"raised": float("nan")}
        ok = passes(errors, TOL[dtype])
        worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
        checks.append(dict(op=op_name, variant=variant, dtype=str(dtype), tol=TOL[dtype], ok=ok, errors=errors))
        per = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
        print(f"| {op_name} | {variant} | {dtype} | {worst:.1e} | {TOL[dtype]:.0e} | {'PASS' if ok else 'FAIL'} "
              f"| {per} |", flush=True)

    print("## accuracy (triton vs torch path in float32 on the same values)\n")
    print("| op | variant | dtype | worst rel. error | tol | pass | per tensor |")
    print("|---|---|---|---|---|---|---|")
    for op_name, variant, op, kw, settings in cases:
        for dtype in (torch.float32, torch.bfloat16):
            with kernel_settings(dr, settings):
                errors = guarded(check_op, op, kw, dtype, gen)
            record(op_name, variant, dtype, errors)

    # decode steps: (B, H, K, V) states, 8 positions of inputs
    Bd = args.decode_batch
    step_cases = []
    for kind, (decay, bonus) in LA_KINDS.items():
        kw = la_inputs(Bd, 8, H, D, decay, bonus, gen)
        step_cases.append(("linear_attention_step", kind, linear_attention_step, kw["initial_state"],
                           ([kw["q"], kw["k"], kw["v"], kw.get("g"), kw.get("u")], {})))
    kw = delta_inputs(Bd, 8, H, D, gen)
    step_cases.append(("delta_rule_step", "gated", delta_rule_step, kw["initial_state"],
                       ([kw["q"], kw["k"], kw["v"], kw["beta"], kw["g"]], {})))
    for op_name, variant, step, state, inputs in step_cases:
        for dtype in (torch.float32, torch.bfloat16):
            cast = ([x.to(dtype) if i < 3 else x for i, x in enumerate(inputs[0])], inputs[1])  # q, k, v
            record(f"{op_name} (B={Bd})", variant, dtype, guarded(check_step, step, state, cast))

    if DEV != "cuda":
        args.no_sweep = True
        cases = step_cases = []  # no timing on the CPU
    print("\n## speed (median ms, CUDA events)\n")
    print("| op | variant | dtype | mode | triton ms | torch ms | torch / triton |")
    print("|---|---|---|---|---|---|---|")
    for op_name, variant, op, kw, settings in cases:
        if "documents" in variant:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("fwd", "fwd+bwd"):
                elapsed = time.perf_counter() - start
                budget = 0.3 if elapsed < 90 else 0.05  # the whole check stays under 3 minutes
                with kernel_settings(dr, settings):
                    ms = {b: "skipped (time budget)" if elapsed > 150 else guarded(time_op, op, kw, dtype, b, mode,
                                                                                   budget)
                          for b in ("triton", "torch")}
                ratio = ms["torch"] / ms["triton"] if is_ms(ms["torch"]) and is_ms(ms["triton"]) else None
                timings.append(dict(op=op_name, variant=variant, dtype=str(dtype), mode=mode, batch=B, seqlen=L,
                                    heads=H, dim=D, triton_ms=ms["triton"], torch_ms=ms["torch"], ratio=ratio))
                print(f"| {op_name} | {variant} | {dtype} | {mode} | {fmt(ms['triton'])} | {fmt(ms['torch'])} | "
                      f"{fmt(ratio)} |", flush=True)
    for op_name, variant, step, state, inputs in step_cases:
        dtype = torch.bfloat16
        step_args = [x if x is None or x.dim() < 3 else x[:, 0] for x in inputs[0]]
        step_args = [x.to(dtype) if i < 3 else x for i, x in enumerate(step_args)]  # q, k, v
        ms = {b: guarded(time_step, step, state.clone(), step_args, inputs[1], b, 0.1) for b in ("triton", "torch")}
        ratio = ms["torch"] / ms["triton"] if is_ms(ms["torch"]) and is_ms(ms["triton"]) else None
        timings.append(dict(op=op_name, variant=variant, dtype=str(dtype), mode="step", batch=Bd, heads=H, dim=D,
                            triton_ms=ms["triton"], torch_ms=ms["torch"], ratio=ratio))
        print(f"| {op_name} (B={Bd}) | {variant} | {dtype} | step | {fmt(ms['triton'])} | {fmt(ms['torch'])} | "
              f"{fmt(ratio)} |", flush=True)

    if not args.no_sweep:
        print("\n## delta-rule kernel settings (timed in bf16; o error vs the float32 torch path on float32 inputs)\n")
        print("| mode | settings | ms | o rel. error |")
        print("|---|---|---|---|")
        o_ref = delta_rule(**plain, backend="torch")
        for mode, settings in SWEEP:
            if time.perf_counter() - start > 165:
                print("| (time budget reached) | | | |")
                break
            with kernel_settings(dr, settings):
                ms = guarded(time_op, delta_rule, plain, torch.bfloat16, "triton", mode, 0.2)
                err = guarded(lambda: rel(delta_rule(**plain, backend="triton"), o_ref))
            sweep.append(dict(mode=mode, settings=settings, ms=ms, o_error=err))
            print(f"| {mode} | {settings} | {fmt(ms)} | {f'{err:.1e}' if isinstance(err, float) else fmt(err)} |",
                  flush=True)

    failed = [c for c in checks if not c["ok"]]
    elapsed = time.perf_counter() - start
    print(f"\n{len(checks) - len(failed)}/{len(checks)} accuracy checks passed in {elapsed:.0f} s")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=device_name, shape=dict(batch=B, seqlen=L, heads=H, dim=D),
                       decode_batch=Bd, passed=not failed, checks=checks, timings=timings, sweep=sweep,
                       defaults={n: getattr(dr, n) for n in SETTINGS}, seconds=elapsed), f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
