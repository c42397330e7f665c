"""The selective scan's lane forward (the default, TUNING["fwd_variant"] = "lane") equals the chunk forward and the
torch path: output, final state and every gradient, on fresh random inputs.

On the CPU these run under TRITON_INTERPRET=1 (``make test`` sets it); on a CUDA machine natively. The backward is
the chunk backward in both runs, reading the variant's checkpoints.
Tolerances (relative error ||out - ref|| / ||ref||): float32 1e-5 against both references (float32 state, sums in
another order); bf16 inputs 2e-2 against the torch path (bf16 outputs and gradients, 2^-8 relative each) and 1e-2
against the chunk forward. NaN never passes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_env import DEVICE, TRITON_MARKS  # noqa: E402

pytestmark = TRITON_MARKS
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# name: (batch, seqlen, dim, N, groups, dtype, options, TUNING of the variant run)
CASES = {
    # N 8, two groups, every option, three documents per row, a partial last chunk (70 = 8 x 8 + 6)
    "full_n8_g2": (2, 70, 64, 8, 2, torch.float32,
                   dict(D=True, z=True, bias=True, init=True, docs=True, dfinal=True),
                   dict(fwd_variant="lane", fwd_parts=1)),
    # N 16 in bf16: B, C read as int32 pairs
    "bf16_n16": (2, 70, 64, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True, dfinal=True),
                 dict(fwd_variant="lane", fwd_parts=1)),
    # no skip, gate, bias or softplus; time split into 3 segments (states-only pass and fold), y saved for dz
    "split3_n16": (1, 70, 32, 16, 1, torch.float32, dict(init=True, softplus=False, dfinal=True),
                   dict(fwd_variant="lane", fwd_parts=1, SPLIT_T=3)),
    "split3_docs_save_y": (2, 45, 32, 8, 2, torch.float32, dict(D=True, z=True, bias=True, docs=True, dfinal=True),
                           dict(fwd_variant="lane", fwd_parts=1, SPLIT_T=3, SAVE_Y=True)),
    # N 3 (padded to 4, masked B/C pieces), 3 channels per group (blocks of 1 channel)
    "odd_n3": (1, 20, 6, 3, 2, torch.float32, dict(D=True, z=True, bias=True, init=True, docs=True),
               dict(fwd_variant="lane", fwd_parts=1)),
    # B, C loaded one step ahead; a sequence shorter than one chunk
    "ahead1": (2, 5, 64, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True, init=True, dfinal=True),
               dict(fwd_variant="lane", fwd_parts=1, lane_bc_ahead=1)),
    # bf16 B, C as float32 copies (no widening in the loop), two steps ahead
    "bc32_ahead2": (2, 21, 64, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True, init=True, dfinal=True),
                    dict(fwd_variant="lane", fwd_parts=1, lane_fwd_bc32=True, lane_bc_ahead=2)),
    # segments' end states and start carries as cut-off sums (scan_segment_states, the default), fast-decaying
    # states: every further term underflows within a few chunks and the passes stop there; documents cut them too
    "split4_decaying": (1, 256, 32, 16, 1, torch.float32,
                        dict(D=True, z=True, bias=True, init=True, dfinal=True, decay=8.0),
                        dict(fwd_variant="lane", fwd_parts=1, SPLIT_T=4)),
    "split4_decaying_docs": (2, 200, 32, 16, 1, torch.bfloat16,
                             dict(D=True, z=True, bias=True, docs=True, dfinal=True, decay=8.0),
                             dict(fwd_variant="lane", fwd_parts=1, SPLIT_T=4)),
    # the same through the kernels' states-only and carry-only passes
    "split4_decaying_forward_states": (1, 128, 32, 16, 1, torch.float32,
                                       dict(D=True, z=True, bias=True, init=True, dfinal=True, decay=8.0),
                                       dict(fwd_variant="lane", fwd_parts=1, SPLIT_T=4, segment_states="scan")),
    # several lanes per channel (scan_parts_fwd): 8 lanes of 2 states, every option, documents, two groups
    "parts8_full_n16_g2": (2, 38, 64, 16, 2, torch.float32,
                           dict(D=True, z=True, bias=True, init=True, docs=True, dfinal=True),
                           dict(fwd_variant="lane", fwd_parts=8)),
    # 4 lanes of 4 states, bf16 inputs; inputs loaded two chunks ahead
    "parts4_bf16_n16_ahead2": (2, 70, 64, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True, dfinal=True),
                               dict(fwd_variant="lane", fwd_parts=4, parts_ahead=2)),
    # two chunks ahead with fewer steps than that: every chunk clamped
    "parts8_short_ahead2": (1, 11, 32, 16, 1, torch.float32, dict(D=True, z=True, bias=True, init=True, dfinal=True),
                            dict(fwd_variant="lane", fwd_parts=8, parts_ahead=2)),
    # 2 lanes of 4 states; time split into 3 segments with documents (the group's reset count), y saved for dz
    "parts2_split3_docs_save_y": (2, 45, 32, 8, 2, torch.float32,
                                  dict(D=True, z=True, bias=True, docs=True, dfinal=True),
                                  dict(fwd_variant="lane", fwd_parts=2, SPLIT_T=3, SAVE_Y=True)),
    # 8 lanes, split time, no skip, gate, bias or softplus
    "parts8_split3_n16": (1, 70, 32, 16, 1, torch.float32, dict(init=True, softplus=False, dfinal=True),
                          dict(fwd_variant="lane", fwd_parts=8, SPLIT_T=3)),
    # N 3 padded to 4: one state a lane, the fourth lane of each channel masked
    "parts4_odd_n3": (1, 20, 16, 3, 2, torch.float32, dict(D=True, z=True, bias=True, init=True, docs=True),
                      dict(fwd_variant="lane", fwd_parts=4)),
}
# every run: 32-channel blocks (one warp of channels per program, few programs for the interpreter)
BASE_TUNING = dict(CHUNK_BLOCK_D=32, BWD_BLOCK_D=32, fwd_variant="chunk")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(batch, seqlen, dim, n, groups, dtype, opts, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    softplus = opts.get("softplus", True)
    decay = opts.get("decay", 1.0)  # > 1: |A| and dt that much larger (states forget within a few chunks)
    delta = 0.5 * r(batch, seqlen, dim) - 1.0 + (decay - 1.0) / 4 if softplus else 0.3 * r(batch, seqlen, dim).abs()
    seq_idx = None
    if opts.get("docs"):  # three documents per row at random starts
        cuts = torch.sort(torch.randint(1, seqlen, (batch, 2), generator=gen), dim=1).values
        t = torch.arange(seqlen)
        seq_idx = ((t >= cuts[:, :1]).int() + (t >= cuts[:, 1:]).int()).to(torch.int32).to(DEVICE)
    kw = dict(
        u=r(batch, seqlen, dim).to(dtype), delta=delta.to(dtype), A=-decay * torch.exp(0.5 * r(dim, n)),
        B=r(batch, seqlen, groups, n).to(dtype), C=r(batch, seqlen, groups, n).to(dtype),
        D=r(dim) if opts.get("D") else None, z=r(batch, seqlen, dim).to(dtype) if opts.get("z") else None,
        delta_bias=0.3 * r(dim) if opts.get("bias") else None,
        initial_state=r(batch, dim, n) if opts.get("init") else None,
    )
    kw = {k: (v.to(DEVICE) if v is not None else None) for k, v in kw.items()}
    weights = (r(batch, seqlen, dim).to(DEVICE), r(batch, dim, n).to(DEVICE) if opts.get("dfinal") else None)
    return kw, seq_idx, softplus, weights


def run(backend, kw, seq_idx, softplus, weights, tuning=None, base=BASE_TUNING, through_backward=False):
    """y, final state and the gradients of <y, wy> + <final, wh> for every input present. The Triton forward runs
    with TUNING = base updated by ``tuning``; the backward too when ``through_backward`` (else with the defaults)."""
    from seqlab.ops.selective_scan import selective_scan
    from seqlab.ops.triton import selective_scan as module

    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in kw.items()}
    args = [leaves[k] for k in NAMES]
    module.TUNING.clear()
    try:
        if backend == "torch":
            y, hT = selective_scan(*args[:8], softplus, args[8], return_final_state=True, seq_idx=seq_idx,
                                   backend="torch")
        else:
            module.TUNING.update(base, **(tuning or {}))
            y, hT = module.selective_scan_triton(*args[:8], softplus, args[8], seq_idx)
            if not through_backward:
                module.TUNING.clear()
        loss = (y.double() * weights[0].double()).sum()
        if weights[1] is not None:
            loss = loss + (hT.double() * weights[1].double()).sum()
        present = [k for k in NAMES if leaves[k] is not None]
        grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    finally:
        module.TUNING.clear()
    return dict(y=y.detach(), final_state=hT.detach(), **{f"grad {k}": g for k, g in zip(present, grads)})


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_variant_matches_default_and_torch(case):
    batch, seqlen, dim, n, groups, dtype, opts, tuning = CASES[case]
    kw, seq_idx, softplus, weights = make_inputs(batch, seqlen, dim, n, groups, dtype, opts, seed=11)
    variant = run("triton", kw, seq_idx, softplus, weights, tuning)
    default = run("triton", kw, seq_idx, softplus, weights)
    ref = run("torch", kw, seq_idx, softplus, weights)
    tol_default, tol_torch = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    assert variant.keys() == ref.keys() == default.keys()
    for name in ref:
        assert variant[name].dtype == default[name].dtype and variant[name].shape == default[name].shape, name
        err = rel_err(variant[name], default[name])
        assert err <= tol_default, f"{name}: relative error {err:.2e} against the default kernel > {tol_default:.0e}"
        err = rel_err(variant[name], ref[name])
        assert err <= tol_torch, f"{name}: relative error {err:.2e} against the torch path > {tol_torch:.0e}"


def test_unknown_fwd_variant_is_refused():
    from seqlab.ops.triton import selective_scan as module

    kw, seq_idx, softplus, weights = make_inputs(1, 8, 32, 4, 1, torch.float32, {}, seed=0)
    with pytest.raises(ValueError, match="fwd_variant"):
        run("triton", kw, seq_idx, softplus, weights, dict(fwd_variant="nope"))
    assert module.TUNING == {}


def test_lanes_per_channel_setting_is_checked():
    """TUNING["fwd_parts"]: one lane per channel unless set; a setting the state size or the B/C groups cannot take
    is refused, naming it."""
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    try:
        assert module._fwd_parts(4096, 16, 1) == 1
        module.TUNING["fwd_parts"] = 8
        assert module._fwd_parts(4096, 16, 1) == 8
        for bad, dim, n, groups in ((3, 4096, 16, 1), (16, 4096, 16, 1), (8, 4096, 4, 1), (2, 48, 16, 2)):
            module.TUNING["fwd_parts"] = bad
            with pytest.raises(ValueError, match="fwd_parts"):
                module._fwd_parts(dim, n, groups)
    finally:
        module.TUNING.clear()


@pytest.mark.parametrize("case", ["split4_decaying", "split4_decaying_docs", "split3_n16", "split3_docs_save_y"])
def test_split_backward_carries_match_torch(case):
    """The backward split into the case's segments too: the start carries as cut-off sums (the default) equal the
    carry-only pass and the torch path in every gradient (same tolerances as above)."""
    batch, seqlen, dim, n, groups, dtype, opts, tuning = CASES[case]
    kw, seq_idx, softplus, weights = make_inputs(batch, seqlen, dim, n, groups, dtype, opts, seed=5)
    summed = run("triton", kw, seq_idx, softplus, weights, tuning, through_backward=True)
    scanned = run("triton", kw, seq_idx, softplus, weights, dict(tuning, segment_states="scan"),
                  through_backward=True)
    ref = run("torch", kw, seq_idx, softplus, weights)
    tol_default, tol_torch = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    for name in ref:
        err = rel_err(summed[name], scanned[name])
        assert err <= tol_default, f"{name}: relative error {err:.2e} against the carry-only pass > {tol_default:.0e}"
        err = rel_err(summed[name], ref[name])
        assert err <= tol_torch, f"{name}: relative error {err:.2e} against the torch path > {tol_torch:.0e}"


def test_segment_sums_stop_where_earlier_terms_underflow():
    """The cut-off is observable: with fast-decaying states, a NaN planted in the first step of the first of 4
    segments stays in that segment's outputs when the end states are cut-off sums (the pass back from the segment's
    end stops long before step 0), and reaches every later segment through the full states-only pass."""
    from seqlab.ops.triton import selective_scan as module

    batch, seqlen, dim, n, groups, dtype, opts, tuning = CASES["split4_decaying"]
    kw, seq_idx, softplus, _ = make_inputs(batch, seqlen, dim, n, groups, dtype, opts, seed=3)
    kw["u"][:, 0] = float("nan")
    args = [kw[k] for k in NAMES]
    outs = {}
    for how in ("sum", "scan"):
        module.TUNING.clear()
        module.TUNING.update(BASE_TUNING, **tuning, segment_states=how)
        try:
            with torch.no_grad():
                outs[how] = module.selective_scan_triton(*args[:8], softplus, args[8], seq_idx)[0]
        finally:
            module.TUNING.clear()
    segment = seqlen // 4
    assert torch.isnan(outs["sum"][:, :segment]).any() and torch.isnan(outs["scan"][:, :segment]).any()
    assert torch.isfinite(outs["sum"][:, segment:]).all()
    assert torch.isnan(outs["scan"][:, segment:]).all()


def test_segment_cutoff_sets_where_the_sums_stop():
    """TUNING["segment_cutoff"] is the log2 weight where the segment sums stop. With dt = 0.5 and A = -1 everywhere
    the sum back from a segment's end stops after 96 steps at -64 (c = 0.5 x 96 > 64 ln 2) and after 184 at -127; a
    NaN planted 140 steps before the first segment's end therefore reaches the later segments at -127 only. Where
    nothing is planted the two cut-offs give the same outputs (terms below 2^-64 of the others vanish in float32)."""
    from seqlab.ops.triton import selective_scan as module

    batch, seqlen, dim, n, segments = 1, 512, 32, 16, 2
    gen = torch.Generator().manual_seed(11)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    u, z, B, C = rnd(batch, seqlen, dim), rnd(batch, seqlen, dim), rnd(batch, seqlen, 1, n), rnd(batch, seqlen, 1, n)
    delta = torch.zeros(batch, seqlen, dim, device=DEVICE)
    bias = torch.full((dim,), 0.5, device=DEVICE).expm1().log()  # softplus(bias) = 0.5
    A, D = -torch.ones(dim, n, device=DEVICE), torch.ones(dim, device=DEVICE)
    planted = u.clone()
    planted[:, seqlen // segments - 140] = float("nan")
    outs = {}
    for cutoff in (-127, -64):
        module.TUNING.clear()
        module.TUNING.update(BASE_TUNING, fwd_variant="lane", fwd_parts=1, SPLIT_T=segments, segment_cutoff=cutoff)
        try:
            with torch.no_grad():
                for name, x in (("clean", u), ("planted", planted)):
                    outs[cutoff, name] = module.selective_scan_triton(x, delta, A, B, C, D, z, bias, True, None, None)
        finally:
            module.TUNING.clear()
    later = slice(seqlen // segments, None)
    assert torch.isnan(outs[-127, "planted"][0][:, later]).all()
    assert torch.isfinite(outs[-64, "planted"][0][:, later]).all()
    assert torch.isfinite(outs[-64, "planted"][1]).all()
    for k in range(2):  # y and the final state
        assert torch.equal(outs[-64, "clean"][k], outs[-127, "clean"][k])


def test_segment_cutoff_setting_is_checked():
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    try:
        assert module._segment_cutoff() == -64.0
        for bad in (-200, -20, "low", True):
            module.TUNING["segment_cutoff"] = bad
            with pytest.raises(ValueError, match="segment_cutoff"):
                module._segment_cutoff()
    finally:
        module.TUNING.clear()
