"""Triton kernels equal plain sequential references, forward and gradients (float32).

On the CPU these run under TRITON_INTERPRET=1 (``make test`` sets it) on small shapes; on a CUDA machine
they run natively. References are the plain loops below (float64), so these tests stand on their own.
Tolerance: relative error ||out - ref|| / ||ref|| <= 1e-4 for float32 kernels (float32 accumulation,
differently ordered sums); NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from triton_env import DEVICE, TRITON_MARKS  # noqa: E402

pytestmark = TRITON_MARKS
RTOL = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, out, ref, tol: float = RTOL) -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def resets(seq_idx: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor:
    """(B, L) bool: a new document starts at t (t > 0)."""
    r = torch.zeros(batch, seqlen, dtype=torch.bool, device=DEVICE)
    if seq_idx is not None:
        r[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return r


def make_seq_idx(batch: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    """Random packed documents, including a non-monotone id sequence (a reset is any change)."""
    cuts = (torch.rand(batch, seqlen, generator=gen) < 0.15).long()
    cuts[:, 0] = 0
    seq_idx = cuts.cumsum(1) % 3
    return seq_idx.to(torch.int32).to(DEVICE)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def grads_of(out_tensors, inputs, seed: int):
    """Gradients of a random linear functional of the outputs (so every output element matters)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in out_tensors)
    present = [t for t in inputs if t is not None]
    gs = torch.autograd.grad(loss, present, allow_unused=True)
    it = iter(gs)
    return [next(it) if t is not None else None for t in inputs]


# ----------------------------------------------------------------------------------------- selective scan


def selective_scan_loop(u, delta, A, B, C, D, z, delta_bias, softplus, h0, seq_idx):
    """Sequential float64 reference. B, C (B, L, G, N)."""
    batch, seqlen, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()
    dt = F.softplus(delta) if softplus else delta
    Bd = B.repeat_interleave(dim // G, dim=2)  # (B, L, D, N)
    Cd = C.repeat_interleave(dim // G, dim=2)
    reset = resets(seq_idx, batch, seqlen)
    h = h0.double() if h0 is not None else u.new_zeros(batch, dim, N)
    ys = []
    for t in range(seqlen):
        h = torch.where(reset[:, t, None, None], torch.zeros_like(h), h)
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bd[:, t]
        ys.append((h * Cd[:, t]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.double() * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


SCAN_CASES = {
    # name: (batch, seqlen, dim, N, G, options)
    "plain": (2, 37, 8, 4, 1, dict()),
    "full": (2, 45, 32, 8, 2, dict(D=True, z=True, bias=True, init=True, dfinal=True, seq_idx=True)),
    "groups_split_block": (1, 20, 6, 3, 2, dict(D=True, z=True, seq_idx=True)),
    "no_softplus": (1, 17, 16, 16, 1, dict(softplus=False, init=True)),
}


def _scan_inputs(batch, seqlen, dim, N, G, opts, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32).to(DEVICE)
    u = r(batch, seqlen, dim).to(dtype)
    delta = (0.5 * r(batch, seqlen, dim) - 1.0).to(dtype)
    if not opts.get("softplus", True):
        delta = delta.abs() * 0.3
    A = -torch.exp(0.5 * r(dim, N))
    B = r(batch, seqlen, G, N).to(dtype)
    C = r(batch, seqlen, G, N).to(dtype)
    D = r(dim) if opts.get("D") else None
    z = r(batch, seqlen, dim).to(dtype) if opts.get("z") else None
    bias = 0.3 * r(dim) if opts.get("bias") else None
    h0 = r(batch, dim, N) if opts.get("init") else None
    seq_idx = make_seq_idx(batch, seqlen, gen) if opts.get("seq_idx") else None
    return u, delta, A, B, C, D, z, bias, h0, seq_idx


def assert_scan_matches_loop(module, shape, opts, seed):
    """``module.selective_scan_triton`` (with its TUNING as set) equals the float64 loop to 1e-4: y, the final
    state, and every gradient of a random functional of y (and of the final state with opts["dfinal"]).
    shape = (batch, seqlen, dim, N, groups)."""
    u, delta, A, B, C, D, z, bias, h0, seq_idx = _scan_inputs(*shape, opts, seed=seed)
    softplus = opts.get("softplus", True)
    ins = leaves(u, delta, A, B, C, D, z, bias, h0)
    y, hT = module.selective_scan_triton(*ins[:8], softplus, ins[8], seq_idx)
    ins_ref = leaves(u, delta, A, B, C, D, z, bias, h0)
    y_ref, hT_ref = selective_scan_loop(*ins_ref[:8], softplus, ins_ref[8], seq_idx)
    assert_close("y", y, y_ref)
    assert_close("final_state", hT, hT_ref)
    outs, outs_ref = ([y, hT], [y_ref, hT_ref]) if opts.get("dfinal") else ([y], [y_ref])
    gs, gs_ref = grads_of(outs, ins, seed=seed + 1), grads_of(outs_ref, ins_ref, seed=seed + 1)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"], gs, gs_ref):
        if g_ref is not None:
            assert g is not None, f"no gradient for {name}"
            assert_close(f"grad {name}", g, g_ref)


@pytest.fixture(params=["chunk", "loop", "tile"])
def scan_forward(request):
    """Every forward kernel: the chunk kernels (one warp per channel block, 8 steps per iteration; small blocks so
    several programs run), the older time loop, and the tile-parallel associative scan."""
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    module.TUNING.update(forward=request.param, SEQ_BLOCK_D=4, CHUNK_BLOCK_D=4, BWD_BLOCK_D=4, SPLIT_T=1)
    yield request.param
    module.TUNING.clear()


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_triton_matches_loop(case, scan_forward):
    from seqlab.ops.triton.selective_scan import selective_scan_triton

    batch, seqlen, dim, N, G, opts = SCAN_CASES[case]
    u, delta, A, B, C, D, z, bias, h0, seq_idx = _scan_inputs(batch, seqlen, dim, N, G, opts)
    softplus = opts.get("softplus", True)
    ins = leaves(u, delta, A, B, C, D, z, bias, h0)
    y, hT = selective_scan_triton(*ins[:8], softplus, ins[8], seq_idx)
    ins_ref = leaves(u, delta, A, B, C, D, z, bias, h0)
    y_ref, hT_ref = selective_scan_loop(*ins_ref[:8], softplus, ins_ref[8], seq_idx)
    assert y.dtype == u.dtype and hT.dtype == torch.float32
    assert_close("y", y, y_ref)
    assert_close("final_state", hT, hT_ref)
    outs, outs_ref = ([y, hT], [y_ref, hT_ref]) if opts.get("dfinal") else ([y], [y_ref])
    gs = grads_of(outs, ins, seed=1)
    gs_ref = grads_of(outs_ref, ins_ref, seed=1)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    for name, g, g_ref in zip(names, gs, gs_ref):
        if g_ref is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close(f"grad {name}", g, g_ref)


SPLIT_CASES = {
    # name: (batch, seqlen, dim, N, G, options, TUNING): time split into segments (grid axis 2), L not a multiple
    # of 8 or of the segment, a states-only pass plus a fold in both directions
    "batch1_split3": (1, 70, 16, 4, 1, dict(D=True, z=True, bias=True, init=True, dfinal=True),
                      dict(SPLIT_T=3, CHUNK_BLOCK_D=8, BWD_BLOCK_D=4, SAVE_Y=True)),
    "docs_split4": (2, 45, 32, 8, 2, dict(D=True, z=True, bias=True, init=True, dfinal=True, seq_idx=True),
                    dict(SPLIT_T=4, CHUNK_BLOCK_D=8, BWD_BLOCK_D=8, BWD_PREFETCH=True)),
    "no_softplus_prefetch": (1, 17, 16, 16, 1, dict(softplus=False, init=True),
                             dict(SPLIT_T=2, BWD_PREFETCH=True, CHUNK_WARPS=2, BWD_WARPS=2)),
    "defaults_auto_split": (1, 600, 8, 4, 1, dict(D=True, z=True, bias=True), dict()),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_selective_scan_chunk_time_split_matches_loop(case):
    """The chunk kernels with time segments equal the float64 loop (forward, final state, all gradients) to 1e-4."""
    from seqlab.ops.triton import selective_scan as module

    batch, seqlen, dim, N, G, opts, tuning = SPLIT_CASES[case]
    module.TUNING.clear()
    module.TUNING.update(tuning)
    try:
        assert_scan_matches_loop(module, (batch, seqlen, dim, N, G), opts, seed=3)
    finally:
        module.TUNING.clear()


BWD_VARIANTS = {
    # TUNING of the chunk backward's variants (the forward is the chunk kernel in every run)
    "bc_step": dict(BWD_BC_STEP=True),
    "bc_tiles": dict(BWD_BC_STEP=False),
    "capped_no_prefetch": dict(BWD_MAXNREG=128, BWD_PREFETCH=False),
    "saved_y_no_prefetch": dict(SAVE_Y=True, BWD_PREFETCH=False),
}


@pytest.mark.parametrize("variant", list(BWD_VARIANTS))
def test_selective_scan_chunk_backward_variants_match_loop(variant, monkeypatch):
    """Every backward variant equals the float64 loop (all gradients, 1e-4): L = 45 (a partial last chunk), two
    time segments (the carry-only pass and the fold), documents, two B/C groups, initial and final states."""
    from seqlab.ops.triton import selective_scan as module

    tuning = dict(fwd_variant="chunk", CHUNK_BLOCK_D=8, BWD_BLOCK_D=8, SPLIT_T=2, **BWD_VARIANTS[variant])
    monkeypatch.setattr(module, "TUNING", tuning)
    opts = dict(D=True, z=True, bias=True, init=True, dfinal=True, seq_idx=True)
    assert_scan_matches_loop(module, (2, 45, 16, 8, 2), opts, seed=5)


def test_selective_scan_chunk_plan_splits_time_only_for_few_programs():
    """Occupancy plan: for the chunk kernel narrower channel blocks first, then time segments (multiples of 8 steps)
    for small batches; the lane kernel keeps a warp's 32 channels and splits time."""
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    assert module._chunk_fwd_block_d(8, 4096, 1, "chunk") == 32
    assert module._chunk_fwd_block_d(1, 4096, 1, "chunk") == 8
    assert module._chunk_fwd_block_d(1, 4096, 1, "lane") == 32
    assert module._chunk_fwd_block_d(1, 4096 + 16, 1, "lane") == 16  # a power of two dividing the channels
    assert module._chunk_segments(4096 // 32, 65536) == (8, 8192)
    assert module._chunk_segments(8 * 4096 // 32, 2048) == (1, 2048)
    n_seg, seg_len = module._chunk_segments(4096 // 16, 16384)
    assert n_seg == 4 and seg_len % 8 == 0 and n_seg * seg_len >= 16384
    module.TUNING.update(SPLIT_T=3)
    assert module._chunk_segments(10_000, 70) == (3, 24)
    module.TUNING.clear()


def test_selective_scan_triton_extreme_dt_stays_finite():
    from seqlab.ops.triton.selective_scan import selective_scan_triton

    u, delta, A, B, C, D, z, bias, h0, seq_idx = _scan_inputs(1, 40, 8, 4, 1, dict(D=True))
    delta = delta * 0 + torch.tensor([-30.0, 30.0, 80.0, 0.0, -80.0, 5.0, 1e-3, 60.0], device=DEVICE)
    ins = leaves(u, delta, A, B, C, D)
    y, hT = selective_scan_triton(*ins, None, None, True, None, None)
    y_ref, hT_ref = selective_scan_loop(u, delta, A, B, C, D, None, None, True, None, None)
    assert_close("y", y, y_ref)
    y.sum().backward()
    for t in ins:
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------------------- causal conv1d


CONV_CASES = {
    # name: (batch, seqlen, dim, width, options)
    "w4_silu_bias": (2, 70, 24, 4, dict(silu=True, bias=True)),
    "w2_plain": (1, 9, 8, 2, dict()),
    "w3_state_docs": (2, 67, 16, 3, dict(silu=True, bias=True, init=True, seq_idx=True)),
    "w4_short_with_state": (2, 2, 8, 4, dict(silu=True, init=True)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_causal_conv1d_triton_matches_ref(case):
    from seqlab.ops.conv import causal_conv1d
    from seqlab.ops.triton.conv import causal_conv1d_triton

    batch, seqlen, dim, W, opts = CONV_CASES[case]
    gen = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    x, weight = r(batch, seqlen, dim), r(dim, W)
    bias = r(dim) if opts.get("bias") else None
    init = r(batch, dim, W - 1) if opts.get("init") else None
    seq_idx = make_seq_idx(batch, seqlen, gen) if opts.get("seq_idx") else None
    act = "silu" if opts.get("silu") else None
    ins = leaves(x, weight, bias, init)
    y, fin = causal_conv1d_triton(ins[0], ins[1], ins[2], act, ins[3], seq_idx)
    ins_ref = [t.double() if t is not None else None for t in leaves(x, weight, bias, init)]
    ins_ref = leaves(*ins_ref)
    y_ref, fin_ref = causal_conv1d(ins_ref[0], ins_ref[1], ins_ref[2], act, ins_ref[3], return_final_state=True,
                                   seq_idx=seq_idx, backend="ref")
    assert_close("y", y, y_ref)
    assert_close("final_state", fin, fin_ref)
    gs = grads_of([y, fin], ins, seed=3)
    gs_ref = grads_of([y_ref, fin_ref], ins_ref, seed=3)
    for name, g, g_ref in zip(["x", "weight", "bias", "initial_state"], gs, gs_ref):
        if g_ref is not None:
            assert_close(f"grad {name}", g, g_ref)


# ----------------------------------------------------------------------------------------- decode steps


@pytest.mark.parametrize("groups", [1, 2])
def test_selective_state_update_triton_matches_ref(groups):
    from seqlab.ops.selective_scan import selective_state_update
    from seqlab.ops.triton.decode import selective_state_update_triton

    batch, dim, N = 3, 12, 5
    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    state = r(batch, dim, N)
    x, dt, z = r(batch, dim), r(batch, dim), r(batch, dim)
    A, B, C, D, dt_bias = -torch.exp(r(dim, N)), r(batch, groups, N), r(batch, groups, N), r(dim), r(dim)
    state_ref = state.clone()
    y = selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = selective_state_update(state_ref, x, dt, A, B, C, D, z, dt_bias, True, backend="ref")
    assert_close("y", y, y_ref)
    assert_close("state", state, state_ref)


@pytest.mark.parametrize("d_shape", ["per_head", "per_channel"])
def test_ssd_state_update_triton_matches_ref(d_shape):
    from seqlab.ops.ssd import ssd_state_update
    from seqlab.ops.triton.decode import ssd_state_update_triton

    batch, H, P, G, N = 2, 4, 6, 2, 8
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    state = r(batch, H, P, N)
    x, z, dt = r(batch, H, P), r(batch, H, P), r(batch, H)
    A, B, C, dt_bias = -torch.exp(r(H)), r(batch, G, N), r(batch, G, N), r(H)
    D = r(H) if d_shape == "per_head" else r(H, P)
    state_ref = state.clone()
    y = ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = ssd_state_update(state_ref, x, dt, A, B, C, D, z, dt_bias, True, backend="ref")
    assert_close("y", y, y_ref)
    assert_close("state", state, state_ref)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_step_triton_matches_ref(width):
    from seqlab.ops.conv import conv_step
    from seqlab.ops.triton.decode import conv_step_triton

    batch, dim = 2, 10
    gen = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    state, x, weight, bias = r(batch, dim, width - 1), r(batch, dim), r(dim, width), r(dim)
    state_ref = state.clone()
    for _ in range(3):  # the state carries across steps
        y = conv_step_triton(state, x, weight, bias, "silu")
        y_ref = conv_step(state_ref, x, weight, bias, "silu", backend="ref")
        assert_close("y", y, y_ref)
        assert_close("state", state, state_ref)
        x = r(batch, dim)


# ----------------------------------------------------------------------------------------- SSD (Mamba-2)


SSD_CASES = {
    # name: (batch, seqlen, H, P, G, N, chunk_size, options)
    "plain_one_partial_chunk": (1, 50, 2, 16, 1, 16, 64, dict()),
    "full_four_chunks": (2, 61, 4, 16, 2, 16, 16, dict(D=True, z=True, bias=True, init=True, seq_idx=True)),
    "d_per_channel_odd_sizes": (1, 40, 2, 20, 1, 24, 32, dict(D="per_channel", init=True)),
}


def _ssd_inputs(batch, seqlen, H, P, G, N, opts, seed=7, dtype=torch.float32):
    """x, dt, A, B, C, D, z, dt_bias, initial_state (None where the option is off) and seq_idx."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    x, dt = r(batch, seqlen, H, P), 0.5 * r(batch, seqlen, H) - 1.0
    A, B, C = -torch.exp(0.5 * r(H)), r(batch, seqlen, G, N), r(batch, seqlen, G, N)
    D = (r(H, P) if opts["D"] == "per_channel" else r(H)) if opts.get("D") else None
    z = r(batch, seqlen, H, P) if opts.get("z") else None
    bias = 0.3 * r(H) if opts.get("bias") else None
    init = r(batch, H, P, N) if opts.get("init") else None
    seq_idx = make_seq_idx(batch, seqlen, gen) if opts.get("seq_idx") else None
    x, dt, B, C, z = (t.to(dtype) if t is not None else None for t in (x, dt, B, C, z))
    return [x, dt, A, B, C, D, z, bias, init], seq_idx


_SSD_GRADS = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


def _ssd_run(ins, chunk, seq_idx):
    """(y, final_state, gradients) of the Triton path and of the float64 reference on the same values."""
    from seqlab.ops.ssd import ssd
    from seqlab.ops.triton.ssd import ssd_triton

    ins = leaves(*ins)
    y, fin = ssd_triton(*ins[:5], chunk, *ins[5:8], True, ins[8], seq_idx)
    ins_ref = leaves(*[t.double() if t is not None else None for t in ins])
    y_ref, fin_ref = ssd(*ins_ref[:5], chunk_size=chunk, D=ins_ref[5], z=ins_ref[6], dt_bias=ins_ref[7],
                         initial_state=ins_ref[8], return_final_state=True, seq_idx=seq_idx, backend="ref")
    return (y, fin, grads_of([y, fin], ins, seed=8)), (y_ref, fin_ref, grads_of([y_ref, fin_ref], ins_ref, seed=8))


def _ssd_assert_close(out, ref, tol=RTOL):
    (y, fin, gs), (y_ref, fin_ref, gs_ref) = out, ref
    assert_close("y", y, y_ref, tol)
    assert_close("final_state", fin, fin_ref, tol)
    for name, g, g_ref in zip(_SSD_GRADS, gs, gs_ref):
        if g_ref is not None:
            assert_close(f"grad {name}", g, g_ref, tol)


@pytest.mark.parametrize("case", list(SSD_CASES))
def test_ssd_triton_matches_ref(case):
    batch, seqlen, H, P, G, N, chunk, opts = SSD_CASES[case]
    ins, seq_idx = _ssd_inputs(batch, seqlen, H, P, G, N, opts)
    out, ref = _ssd_run(ins, chunk, seq_idx)
    assert out[0].dtype == ins[0].dtype and out[1].dtype == torch.float32
    _ssd_assert_close(out, ref)


SSD_TUNINGS = {
    # the unfused kernels (chunk states, then a separate state pass; old backward with per-head atomics)
    "unfused": {"fused_state": False, "bwd_variant": "chunk"},
    # fused state passes over 2 x 2 (P, N) tiles; 2 heads per backward program, 2 programs per group (atomics);
    # all 4 heads of a group per output program
    "fused_state_tiles_and_head_loop": {"state_block_p": 16, "state_block_n": 16, "bwd_heads": 2, "out_heads": 4,
                                        "bwd_variant": "chunk"},
    # one head per backward program with the passing-decay gradient formed in the chunk kernel
    "fused_one_head_per_program": {"bwd_heads": 1, "state_stages": 1, "out_heads": 2, "bwd_variant": "chunk"},
    # split backward: dx/dt/dz/dD/dA kernel over 2 N slices; dB/dC kernel over 2 N tiles, 2 programs per group
    # (atomics)
    "split_backward_sliced": {"bwd_variant": "split", "bwd_dx_block_n": 16, "bwd_dbc_block_n": 16,
                              "bwd_dbc_splits": 2},
    # split backward after the unfused state passes (passing-decay gradient read from dlast), whole-N tiles
    "split_backward_unfused": {"bwd_variant": "split", "fused_state": False},
}


@pytest.mark.parametrize("tuning", list(SSD_TUNINGS))
def test_ssd_triton_every_kernel_path_matches_ref(tuning, monkeypatch):
    """Every TUNING-selectable path: 3 chunks with a partial last one, 4 heads per group, documents, states."""
    from seqlab.ops.triton import ssd as tssd

    monkeypatch.setattr(tssd, "TUNING", dict(SSD_TUNINGS[tuning]))
    opts = dict(D=True, z=True, bias=True, init=True, seq_idx=True)
    ins, seq_idx = _ssd_inputs(2, 45, 8, 32, 2, 32, opts, seed=11)
    _ssd_assert_close(*_ssd_run(ins, 16, seq_idx))


def test_ssd_backward_takes_fewer_heads_per_program_when_the_tiles_do_not_fit(monkeypatch):
    """A backward chunk kernel that the compiler cannot fit in shared memory (simulated for more than one head)
    is relaunched with fewer heads per program; the gradients still match the reference."""
    import triton

    from seqlab.ops.triton import ssd as tssd

    real = tssd._ssd_bwd_chunk_kernel
    launched = []

    class TooBigForMoreThanOneHead:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(kwargs["HEADS"])
                if kwargs["HEADS"] > 1:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(tssd, "_ssd_bwd_chunk_kernel", TooBigForMoreThanOneHead())
    monkeypatch.setattr(tssd, "_BWD_HEADS_FIT", {})
    monkeypatch.setattr(tssd, "TUNING", {"bwd_variant": "chunk"})
    opts = dict(D=True, z=True, bias=True, init=True, seq_idx=True)
    ins, seq_idx = _ssd_inputs(2, 45, 8, 32, 2, 32, opts, seed=13)
    _ssd_assert_close(*_ssd_run(ins, 16, seq_idx))
    assert launched == [4, 2, 1] and list(tssd._BWD_HEADS_FIT.values()) == [1]


@pytest.mark.parametrize("state_dtype", ["input", "fp32"])
def test_ssd_triton_bf16_entering_states_within_bf16_tolerance(state_dtype, monkeypatch):
    """bf16 inputs: entering states and their gradients stored in bf16 (default) or float32. The per-chunk kernels
    round both to bf16 for tl.dot either way; outputs and gradients stay within 2e-2 relative error of the float64
    reference on the same bf16 values (bf16 operands, float32 accumulation)."""
    from seqlab.ops.triton import ssd as tssd

    monkeypatch.setattr(tssd, "TUNING", {"state_dtype": state_dtype})
    opts = dict(D=True, z=True, bias=True, init=True, seq_idx=True)
    ins, seq_idx = _ssd_inputs(1, 70, 4, 16, 1, 32, opts, seed=12, dtype=torch.bfloat16)
    out, ref = _ssd_run(ins, 16, seq_idx)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
    _ssd_assert_close(out, ref, tol=2e-2)


def test_ssd_triton_inference_forward_matches_ref():
    """Without autograd the forward runs larger tiles (up to 128 positions); same function."""
    from seqlab.ops.ssd import ssd
    from seqlab.ops.triton.ssd import ssd_triton

    batch, seqlen, H, P, G, N = 1, 150, 2, 16, 1, 16
    gen = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)
    x, dt, A = r(batch, seqlen, H, P), 0.5 * r(batch, seqlen, H) - 1.0, -torch.exp(0.5 * r(H))
    B, C, z, init = r(batch, seqlen, G, N), r(batch, seqlen, G, N), r(batch, seqlen, H, P), r(batch, H, P, N)
    seq_idx = make_seq_idx(batch, seqlen, gen)
    with torch.no_grad():
        y, fin = ssd_triton(x, dt, A, B, C, 128, None, z, None, True, init, seq_idx)
    y_ref, fin_ref = ssd(*(t.double() for t in (x, dt, A, B, C)), chunk_size=128, z=z.double(),
                         initial_state=init.double(), return_final_state=True, seq_idx=seq_idx, backend="ref")
    assert_close("y", y, y_ref)
    assert_close("final_state", fin, fin_ref)


# ----------------------------------------------------------------------------------------- GPU front end on CPU


_LAUNCHED: list = []  # (module, kernel name, signature, constexprs) of every launch under the interpreter


def test_no_grad_forwards_equal_the_autograd_forwards():
    """Under no_grad the scan and SSD run their bare forwards (no checkpoints, SSD's inference tile): same outputs
    (float32, relative error <= 1e-5; the SSD tile differs, so its sums are ordered differently)."""
    from seqlab.ops.triton.selective_scan import selective_scan_triton
    from seqlab.ops.triton.ssd import ssd_triton

    u, delta, A, B, C, D, z, bias, h0, seq_idx = _scan_inputs(2, 40, 8, 4, 1, dict(D=True, z=True, bias=True))
    params = [t.requires_grad_() for t in (A, D, bias)]
    y1, h1 = selective_scan_triton(u, delta, *params[:1], B, C, params[1], z, params[2], True, None, None)
    with torch.no_grad():
        y2, h2 = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, None, None)
    assert y1.requires_grad and not y2.requires_grad
    assert_close("scan y", y2, y1.detach(), 1e-5)
    assert_close("scan final state", h2, h1.detach(), 1e-5)
    ins, _ = _ssd_inputs(1, 150, 2, 16, 1, 16, dict(D=True, z=True, bias=True))
    ins[0].requires_grad_()
    y1, f1 = ssd_triton(*ins[:5], 64, *ins[5:8], True, ins[8], None)
    with torch.no_grad():
        y2, f2 = ssd_triton(*ins[:5], 64, *ins[5:8], True, ins[8], None)
    assert_close("ssd y", y2, y1.detach(), 1e-5)
    assert_close("ssd final state", f2, f1.detach(), 1e-5)


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    """Under the interpreter, remember each kernel specialisation the tests launch (see the last test)."""
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


def test_every_launched_kernel_compiles_for_sm90_front_end():
    """The interpreter runs code the GPU compiler rejects (e.g. a variable whose shape changes inside a runtime
    `if`); lower every specialisation the tests above launched to Triton IR for sm_90, in a clean process."""
    from triton_compile import assert_launched_compile_for_sm90

    assert_launched_compile_for_sm90(_LAUNCHED)
