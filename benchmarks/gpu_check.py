"""One-call GPU check of the Triton SSM kernels, then the kernel benchmarks.

    python benchmarks/gpu_check.py --out results/      # needs CUDA; writes gpu_check.json, kernels.json

1. the interpreter test file, run natively on the GPU (small shapes, every kernel variant compiles);
2. every kernel against the torch path at real shapes, float32 and bf16, forward and every gradient:
   relative error ||out - ref|| / ||ref|| per tensor (the reference runs in float32 on the same, upcast,
   inputs); NaN/inf never passes; includes L = 65536 and extreme step sizes; decode steps replayed
   from a captured CUDA graph;
3. benchmarks/kernels.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke test under TRITON_INTERPRET=1
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
CHECKS: list = []
# interpreter test files that also run natively on a GPU (their tensors go to cuda when it is there)
PYTEST_SECONDS = 300  # the native test run's limit: on a cold Triton cache it is mostly compiling
GPU_TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_small_batch_linear.py", "tests/test_mamba_step.py",
                  "tests/test_ssd_triton_numerics.py", "tests/test_triton_jit_math.py", "tests/test_decode_overhead.py",
                  "tests/test_decode_linear.py", "tests/test_scan_chunk_variants.py",
                  "tests/test_triton_scan_states.py", "tests/test_scan_lane_backward.py"]


def log(*a):
    print(*a, flush=True)


def rel(out, ref) -> float:
    if out is None or ref is None:
        return float("nan") if (out is None) != (ref is None) else 0.0
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def compare(kernel: str, case: str, dtype, names, outs, refs, extra_tol: float = 1.0):
    tol = TOL[dtype] * extra_tol
    worst, detail = 0.0, {}
    for name, o, r in zip(names, outs, refs):
        e = rel(o, r)
        detail[name] = e
        worst = max(worst, e) if not math.isnan(e) else float("inf")
    ok = worst <= tol
    CHECKS.append(dict(kernel=kernel, case=case, dtype=str(dtype), ok=ok, tol=tol, worst=worst, errors=detail))
    errs = " ".join(f"{k}={v:.1e}" for k, v in detail.items())
    log(f"  {'PASS' if ok else 'FAIL'} {kernel:22s} {case:34s} {str(dtype):15s} worst {worst:.1e} (tol {tol:.0e})")
    log(f"       {errs}")


def grads(outs, inputs, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cots = [torch.randn(o.shape, device=DEVICE, generator=g, dtype=torch.float32) for o in outs]
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cots))
    present = [t for t in inputs if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad(loss, present, allow_unused=True))
    return [next(gs) if t is not None and t.requires_grad else None for t in inputs]


def leaf(t, dtype=None, grad=True):
    if t is None:
        return None
    t = t.detach().clone()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.requires_grad_(grad and t.is_floating_point())


def seq_idx_for(batch, seqlen, ndocs):
    cuts = torch.sort(torch.randint(1, seqlen, (batch, ndocs - 1), device=DEVICE), dim=1).values
    pos = torch.arange(seqlen, device=DEVICE)
    return (pos[None, :, None] >= cuts[:, None, :]).sum(-1).to(torch.int32)


# ----------------------------------------------------------------------------------------------- checks


def check_scan(dtype, batch, seqlen, dim, N, case, extreme=False, ndocs=3):
    from seqlab.ops.selective_scan import selective_scan
    from seqlab.ops.triton.selective_scan import selective_scan_triton

    r = lambda *s: torch.randn(*s, device=DEVICE)
    u, z = r(batch, seqlen, dim), r(batch, seqlen, dim)
    delta = 0.5 * r(batch, seqlen, dim) - 2.0
    if extreme:  # softplus(delta) from ~1e-13 to 100: exp(dt A) underflows to 0 and sits at 1
        delta = delta * 0 + torch.empty(1, 1, dim, device=DEVICE).uniform_(-30, 100)
    A = -torch.exp(torch.rand(dim, N, device=DEVICE) * math.log(16))
    B, C = r(batch, seqlen, 1, N), r(batch, seqlen, 1, N)
    D, bias, h0 = r(dim), 0.1 * r(dim), r(batch, dim, N)
    seq_idx = seq_idx_for(batch, seqlen, ndocs) if ndocs > 1 else None
    act = [u, delta, B, C, z]
    par = [A, D, bias, h0]
    ins = [leaf(t, dtype) for t in act] + [leaf(t) for t in par]
    y, hT = selective_scan_triton(ins[0], ins[1], ins[5], ins[2], ins[3], ins[6], ins[4], ins[7], True, ins[8], seq_idx)
    ref_ins = [leaf(t.to(dtype).float()) for t in act] + [leaf(t) for t in par]
    y_r, hT_r = selective_scan(ref_ins[0], ref_ins[1], ref_ins[5], ref_ins[2], ref_ins[3], D=ref_ins[6], z=ref_ins[4],
                               delta_bias=ref_ins[7], initial_state=ref_ins[8], return_final_state=True,
                               seq_idx=seq_idx, backend="torch")
    g = grads([y, hT], ins, 1)
    g_r = grads([y_r, hT_r], ref_ins, 1)
    names = ["y", "final_state", "du", "ddelta", "dB", "dC", "dz", "dA", "dD", "ddelta_bias", "dinitial_state"]
    compare("selective_scan", case, dtype, names, [y, hT, *g], [y_r, hT_r, *g_r])


def check_ssd(dtype, batch, seqlen, H, P, N, chunk, case, extreme=False, ndocs=3):
    from seqlab.ops.ssd import ssd
    from seqlab.ops.triton.ssd import ssd_triton

    r = lambda *s: torch.randn(*s, device=DEVICE)
    x, z = r(batch, seqlen, H, P), r(batch, seqlen, H, P)
    dt = 0.5 * r(batch, seqlen, H) - 2.0
    if extreme:
        dt = dt * 0 + torch.empty(1, 1, H, device=DEVICE).uniform_(-30, 100)
    A = -torch.exp(torch.rand(H, device=DEVICE) * math.log(16))
    B, C = r(batch, seqlen, 1, N), r(batch, seqlen, 1, N)
    D, bias, h0 = r(H), 0.1 * r(H), r(batch, H, P, N)
    seq_idx = seq_idx_for(batch, seqlen, ndocs) if ndocs > 1 else None
    act, par = [x, dt, B, C, z], [A, D, bias, h0]
    ins = [leaf(t, dtype) for t in act] + [leaf(t) for t in par]
    y, hT = ssd_triton(ins[0], ins[1], ins[5], ins[2], ins[3], chunk, ins[6], ins[4], ins[7], True, ins[8], seq_idx)
    ref_ins = [leaf(t.to(dtype).float()) for t in act] + [leaf(t) for t in par]
    y_r, hT_r = ssd(ref_ins[0], ref_ins[1], ref_ins[5], ref_ins[2], ref_ins[3], chunk_size=chunk, D=ref_ins[6],
                    z=ref_ins[4], dt_bias=ref_ins[7], initial_state=ref_ins[8], return_final_state=True,
                    seq_idx=seq_idx, backend="torch")
    g = grads([y, hT], ins, 2)
    g_r = grads([y_r, hT_r], ref_ins, 2)
    names = ["y", "final_state", "dx", "ddt", "dB", "dC", "dz", "dA", "dD", "ddt_bias", "dinitial_state"]
    compare("ssd", case, dtype, names, [y, hT, *g], [y_r, hT_r, *g_r])


def check_conv(dtype, batch, seqlen, dim, W, case, ndocs=3):
    from seqlab.ops.conv import causal_conv1d
    from seqlab.ops.triton.conv import causal_conv1d_triton

    r = lambda *s: torch.randn(*s, device=DEVICE)
    x, w, b, h0 = r(batch, seqlen, dim), r(dim, W), r(dim), r(batch, dim, W - 1)
    seq_idx = seq_idx_for(batch, seqlen, ndocs) if ndocs > 1 else None
    ins = [leaf(x, dtype), leaf(w), leaf(b), leaf(h0, dtype)]
    y, fin = causal_conv1d_triton(ins[0], ins[1], ins[2], "silu", ins[3], seq_idx)
    ref = [leaf(x.to(dtype).float()), leaf(w), leaf(b), leaf(h0.to(dtype).float())]
    y_r, fin_r = causal_conv1d(ref[0], ref[1], ref[2], "silu", ref[3], return_final_state=True, seq_idx=seq_idx,
                               backend="torch")
    g, g_r = grads([y, fin], ins, 3), grads([y_r, fin_r], ref, 3)
    compare("causal_conv1d", case, dtype, ["y", "final_state", "dx", "dweight", "dbias", "dinitial_state"],
            [y, fin, *g], [y_r, fin_r, *g_r])


def check_decode_graph(dtype):
    """Decode kernels: eager equals the torch step, and a captured CUDA graph replays the same steps."""
    from seqlab.ops.conv import conv_step
    from seqlab.ops.selective_scan import selective_state_update
    from seqlab.ops.ssd import ssd_state_update
    from seqlab.ops.triton.decode import conv_step_triton, selective_state_update_triton, ssd_state_update_triton

    r = lambda *s, dt=dtype: torch.randn(*s, device=DEVICE, dtype=dt)
    batch, dim, N, H, P, N2, cdim, W = 4, 512, 16, 8, 64, 128, 768, 4
    s1 = torch.randn(batch, dim, N, device=DEVICE)
    x1, dt1, z1 = r(batch, dim), r(batch, dim), r(batch, dim)
    A1, B1, C1 = -torch.rand(dim, N, device=DEVICE), r(batch, 2, N), r(batch, 2, N)
    D1, b1 = torch.randn(dim, device=DEVICE), torch.randn(dim, device=DEVICE)
    s2 = torch.randn(batch, H, P, N2, device=DEVICE)
    x2, z2, dt2 = r(batch, H, P), r(batch, H, P), r(batch, H)
    A2, B2, C2, D2 = -torch.rand(H, device=DEVICE), r(batch, 1, N2), r(batch, 1, N2), torch.randn(H, P, device=DEVICE)
    s3 = r(batch, cdim, W - 1)
    x3, w3, b3 = r(batch, cdim), torch.randn(cdim, W, device=DEVICE), torch.randn(cdim, device=DEVICE)

    def step_triton(s1, s2, s3):
        return (selective_state_update_triton(s1, x1, dt1, A1, B1, C1, D1, z1, b1, True),
                ssd_state_update_triton(s2, x2, dt2, A2, B2, C2, D2, z2, None, True),
                conv_step_triton(s3, x3, w3, b3, "silu"))

    def step_torch(s1, s2, s3):
        return (selective_state_update(s1, x1, dt1, A1, B1, C1, D1, z1, b1, backend="torch"),
                ssd_state_update(s2, x2, dt2, A2, B2, C2, D2, z2, backend="torch"),
                conv_step(s3, x3, w3, b3, "silu", backend="torch"))

    states_t = [s.clone() for s in (s1, s2, s3)]
    states_r = [s.clone() for s in (s1, s2, s3)]
    states_g = [s.clone() for s in (s1, s2, s3)]
    for _ in range(3):
        ys_t = step_triton(*states_t)
        ys_r = step_torch(*states_r)
    names = ["y_selective", "y_ssd", "y_conv", "state_selective", "state_ssd", "state_conv"]
    compare("decode (eager, 3 steps)", "B=4", dtype, names, [*ys_t, *states_t], [*ys_r, *states_r])
    step_triton(*[s.clone() for s in states_g])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            ys_g = step_triton(*states_g)
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    compare("decode (CUDA graph x3)", "B=4", dtype, names, [*ys_g, *states_g], [*ys_r, *states_r])


def check_decode_gemm(repeats: int = 20):
    """The small-batch split-K GEMM at the mamba 1.4b decode shapes, every tile shape of the sweep, called
    ``repeats`` times: each result equals a float32 reference (a lost partial sum shows up as a large error) and
    all repeats are bit-identical (the fixed-order reduction)."""
    import itertools

    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    gen = torch.Generator().manual_seed(0)
    for (n, k), m in itertools.product(((8192, 2048), (160, 4096), (2048, 4096)), (1, 64, 128)):
        x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
        res = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
        ref = torch.addmm(res.float(), x.float(), w.float().t())
        worst, varied, tried = 0.0, 0, 0
        for bn, split in itertools.product((32, 64, 128), (1, 2, 8)):
            cfg = dict(BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, STAGES=3, WARPS=4)
            try:
                outs = [small_batch_linear_triton(x, w, res, cfg) for _ in range(repeats)]
            except Exception as e:  # noqa: BLE001 - a tile the compiler refuses is not a wrong result
                if "OutOfResources" not in type(e).__name__:
                    raise
                continue
            tried += 1
            worst = max(worst, max(rel(o, ref) for o in outs))
            varied += any(not torch.equal(o, outs[0]) for o in outs)
        CHECKS.append(dict(kernel="small_batch_linear", case=f"M{m} N{n} K{k}", dtype="torch.bfloat16",
                           ok=worst <= 1e-2 and varied == 0, tol=1e-2, worst=worst,
                           errors=dict(configs=tried, nondeterministic_configs=varied)))
        log(f"  {'PASS' if CHECKS[-1]['ok'] else 'FAIL'} small_batch_linear M{m} N{n} K{k}: {tried} configs x "
            f"{repeats} calls, worst {worst:.1e} (tol 1e-02), {varied} configs not bit-identical")


def check_decode_model(spec: str, batch: int = 64, steps: int = 8):
    """A model's decode steps with the fused kernels (pre-norm and Mamba's conv step in the in_proj GEMM where the
    timing picks it) against the unfused ops and against the parallel forward over the same tokens, bf16."""
    from seqlab.mixers import base
    from seqlab.models.presets import from_preset

    name, size = spec.split(":")
    torch.manual_seed(0)
    model = from_preset(name, size).to(device=DEVICE, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, 32 + steps), device=DEVICE)
    runs = {}
    with torch.inference_mode():
        full = model(ids)[:, 32:].float()  # (B, steps, V)
        for fused in (True, False):
            base.FUSE_DECODE = fused
            state = model.allocate_state(batch, 32 + steps, device=DEVICE, dtype=torch.bfloat16)
            model(ids[:, :32], state=state)
            runs[fused] = torch.cat([model(ids[:, 32 + i:33 + i], state=state) for i in range(steps)], 1).float()
        base.FUSE_DECODE = True
    # decode step i consumes the token at position 32 + i: its logits are the parallel forward's at 32 + i
    compare("decode model", f"{spec} B={batch} {steps} steps", torch.bfloat16,
            ["fused vs unfused", "fused vs parallel", "unfused vs parallel"],
            [runs[True], runs[True], runs[False]], [runs[False], full, full])


def run_checks(only=None, cases=None, processes: int = 1):
    f32, bf16 = torch.float32, torch.bfloat16
    jobs = [
        ("selective_scan", lambda: check_scan(f32, 2, 2048, 1024, 16, "2x2048 D1024 N16 docs+state")),
        ("selective_scan", lambda: check_scan(bf16, 2, 2048, 1024, 16, "2x2048 D1024 N16 docs+state")),
        ("selective_scan", lambda: check_scan(f32, 1, 65536, 256, 16, "1x65536 D256 N16 docs+state", ndocs=4)),
        ("selective_scan", lambda: check_scan(bf16, 1, 65536, 256, 16, "1x65536 D256 N16 docs+state", ndocs=4)),
        ("selective_scan", lambda: check_scan(f32, 1, 4096, 512, 16, "extreme dt 1x4096 D512", True, 1)),
        ("selective_scan", lambda: check_scan(bf16, 1, 4096, 512, 16, "extreme dt 1x4096 D512", True, 1)),
        ("selective_scan", lambda: check_scan(f32, 2, 2048, 512, 128, "2x2048 D512 N128 docs+state")),
        ("selective_scan", lambda: check_scan(bf16, 2, 2048, 512, 64, "2x2048 D512 N64 docs+state")),
        ("ssd", lambda: check_ssd(f32, 1, 4096, 80, 64, 128, 256, "1x4096 80x64 N128 chunk256 docs+state")),
        ("ssd", lambda: check_ssd(bf16, 1, 4096, 80, 64, 128, 256, "1x4096 80x64 N128 chunk256 docs+state")),
        ("ssd", lambda: check_ssd(f32, 2, 1000, 8, 64, 64, 64, "2x1000 8x64 N64 chunk64 docs+state")),
        ("ssd", lambda: check_ssd(f32, 1, 65536, 8, 64, 128, 256, "1x65536 8x64 N128 docs+state", ndocs=4)),
        ("ssd", lambda: check_ssd(bf16, 1, 65536, 8, 64, 128, 256, "1x65536 8x64 N128 docs+state", ndocs=4)),
        ("ssd", lambda: check_ssd(f32, 1, 4096, 16, 64, 128, 128, "extreme dt 1x4096 16x64", extreme=True, ndocs=1)),
        ("ssd", lambda: check_ssd(bf16, 1, 4096, 16, 64, 128, 128, "extreme dt 1x4096 16x64", extreme=True, ndocs=1)),
        ("conv", lambda: check_conv(f32, 2, 4096, 4096, 4, "2x4096 D4096 W4 docs+state")),
        ("conv", lambda: check_conv(bf16, 2, 4096, 4096, 4, "2x4096 D4096 W4 docs+state")),
        ("conv", lambda: check_conv(bf16, 1, 65536, 512, 3, "1x65536 D512 W3 docs+state", ndocs=5)),
        ("decode_graph", lambda: check_decode_graph(f32)),
        ("decode_graph", lambda: check_decode_graph(bf16)),
        ("decode_gemm", check_decode_gemm),
        ("decode_model", lambda: check_decode_model("mamba:small")),
        ("decode_model", lambda: check_decode_model("mamba2:small")),
        ("decode_model", lambda: check_decode_model("mamba:small", batch=1)),
    ]
    selected = [(i, job) for i, (kind, job) in enumerate(jobs) if not only or any(o in kind for o in only)]
    if cases is not None:
        selected = [(i, job) for i, job in selected if i in cases]
    if processes > 1:  # compiling dominates a cold run: one process per case, CHECKS gathered from their files
        return run_in_processes([i for i, _ in selected], processes)
    for _, job in selected:
        try:
            job()
        except Exception:  # noqa: BLE001 - one broken check must not hide the others
            tb = traceback.format_exc()
            log(f"  ERROR {tb}")
            CHECKS.append(dict(ok=False, error=tb[-1500:]))
        torch.cuda.empty_cache()


def run_in_processes(indices: list[int], processes: int) -> None:
    """Run each check case (an index into run_checks' list) in a process of its own, ``processes`` at a time (the
    Triton compiler is single-threaded and a cold cache makes it the cost of a run); logs each case's output in
    order and adds its CHECKS."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--skip-tests", "--skip-bench",
                                  "--cases", str(i), "--out", tmp], capture_output=True, text=True)
            path = os.path.join(tmp, "gpu_check.json")
            checks = []
            if os.path.exists(path):
                with open(path) as f:
                    checks = json.load(f)["checks"]
        if not checks:
            checks = [dict(ok=False, case=f"case {i}", error=(res.stdout + res.stderr)[-1500:])]
        return res.stdout, checks

    with ThreadPoolExecutor(processes) as pool:
        for out, checks in pool.map(one, indices):
            lines = [ln for ln in out.splitlines() if not ln.startswith(("torch ", "== "))]
            log("\n".join(lines))
            CHECKS.extend(checks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quick-bench", action="store_true")
    p.add_argument("--only", default="",
                   help="comma-separated check kinds: selective_scan,ssd,conv,decode_graph,decode_gemm")
    p.add_argument("--cases", default="", help="comma-separated indices into the check list (after --only)")
    p.add_argument("--jobs", type=int, default=1, help="run the check cases in this many processes at a time")
    p.add_argument("--bench-args", default="", help="extra arguments for benchmarks/kernels.py")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    log(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}, "
        f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    if not torch.cuda.is_available():
        return 2
    summary = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(0)}
    if not args.skip_tests:
        t0 = time.time()
        env = dict(os.environ, TRITON_INTERPRET="0")
        log(f"== pytest {' '.join(GPU_TEST_FILES)} on the GPU")
        try:
            res = subprocess.run([sys.executable, "-m", "pytest", *GPU_TEST_FILES, "-q", "-x",
                                  "-p", "no:cacheprovider", "-m", "not slow"], capture_output=True, text=True,
                                 env=env, timeout=PYTEST_SECONDS)
            log(res.stdout[-3000:], res.stderr[-2000:])
            summary["pytest_rc"] = res.returncode
        except subprocess.TimeoutExpired as err:  # a cold compile cache: record it, the checks still run
            log(f"   ! pytest stopped after {PYTEST_SECONDS} s (compiling); its output so far:")
            out = err.stdout or b""  # bytes even with text=True: the timeout interrupts the decoding
            log((out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:])
            summary["pytest_rc"] = f"timed out after {PYTEST_SECONDS} s"
        summary["pytest_s"] = time.time() - t0
    log("== kernel checks against the torch path")
    t0 = time.time()
    cases = {int(c) for c in args.cases.split(",") if c} or None
    run_checks([o for o in args.only.split(",") if o], cases, args.jobs)
    summary["checks_s"] = time.time() - t0
    summary["checks"] = CHECKS
    summary["all_passed"] = all(c["ok"] for c in CHECKS)
    log(f"== checks: {sum(c['ok'] for c in CHECKS)}/{len(CHECKS)} passed")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    if not args.skip_bench:
        from benchmarks import kernels

        kernels.main(["--out", args.out] + (["--quick"] if args.quick_bench else []) + args.bench_args.split())
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
