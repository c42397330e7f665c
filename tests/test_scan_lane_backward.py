"""The selective scan's lane backward (TUNING["bwd_variant"] = "lane": the channels on the lanes, one or two lanes
per channel, dB/dC summed by a reduce-scatter over the warp; N <= 16) equals the chunk backward and the torch path:
output, final state and every gradient, on fresh random inputs.

On the CPU these run under TRITON_INTERPRET=1 (``make test`` sets it), where the lane exchange is a flip of the
vector; on a CUDA machine natively, with the PTX butterfly shuffle. Tolerances (relative error ||out - ref|| /
||ref||): float32 1e-5 against both (float32 state, sums in another order); bf16 inputs 1e-2 against the chunk
backward and 2e-2 against the torch path (bf16 outputs and gradients, 2^-8 relative each). NaN never passes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from test_scan_chunk_variants import make_inputs, rel_err  # noqa: E402
from test_scan_chunk_variants import run as run_scan  # noqa: E402
from triton_env import DEVICE, TRITON_MARKS  # noqa: E402

from seqlab.ops.triton.scan_lanes import _lane_reduce_scatter, _lane_xor  # noqa: E402

pytestmark = TRITON_MARKS

# name: (batch, seqlen, dim, N, groups, dtype, options, TUNING of both runs)
CASES = {
    # N 8, two groups of 32 channels, every option, three documents per row, a partial last chunk (45 = 5 x 8 + 5)
    "full_n8_g2": (1, 45, 64, 8, 2, torch.float32,
                   dict(D=True, z=True, bias=True, init=True, docs=True, dfinal=True), {}),
    # the same with two lanes per channel (4 states each)
    "full_n8_g2_two_lanes": (1, 45, 64, 8, 2, torch.float32,
                             dict(D=True, z=True, bias=True, init=True, docs=True, dfinal=True),
                             dict(lane_bwd_parts=2)),
    # N 16 in bf16, one and two lanes per channel
    "bf16_n16": (1, 13, 32, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True), {}),
    "bf16_n16_two_lanes": (1, 21, 32, 16, 1, torch.bfloat16, dict(D=True, z=True, bias=True, dfinal=True),
                           dict(lane_bwd_parts=2)),
    # three time segments: the lane kernel's own carry-only pass and the fold; no skip, gate, bias or softplus
    "split3_n16_two_lanes": (1, 40, 32, 16, 1, torch.float32, dict(init=True, softplus=False, dfinal=True),
                             dict(SPLIT_T=3, lane_bwd_parts=2, segment_states="scan")),
    # the same with the carries as cut-off sums (the default) and documents
    "split3_n16_docs_sums": (1, 40, 32, 16, 1, torch.float32, dict(D=True, z=True, bias=True, docs=True, dfinal=True),
                             dict(SPLIT_T=3)),
    # groups of 16 channels (one warp per group), N 4 (2 states a lane); documents
    "docs_n4_g2_two_lanes": (1, 21, 32, 4, 2, torch.float32, dict(D=True, z=True, bias=True, docs=True, dfinal=True),
                             dict(lane_bwd_parts=2)),
    # N 3 (padded to 4), y saved by the forward for dz, two segments, the carry-only pass with documents
    "n3_save_y": (1, 20, 32, 3, 1, torch.float32, dict(D=True, z=True, bias=True, init=True, docs=True),
                  dict(SPLIT_T=2, SAVE_Y=True, segment_states="scan")),
    # N 2 asked with two lanes: too few states to share, one lane per channel
    "n2": (2, 11, 32, 2, 1, torch.float32, dict(D=True, z=True, bias=True, dfinal=True), dict(lane_bwd_parts=2)),
}


def run(backend, kw, seq_idx, softplus, weights, tuning):
    """The scan's outputs and gradients (test_scan_chunk_variants.run) with ``tuning`` alone held through the
    backward."""
    return run_scan(backend, kw, seq_idx, softplus, weights, tuning, base={}, through_backward=True)


@pytest.mark.parametrize("case", list(CASES))
def test_lane_backward_matches_chunk_backward_and_torch(case):
    batch, seqlen, dim, n, groups, dtype, opts, tuning = CASES[case]
    kw, seq_idx, softplus, weights = make_inputs(batch, seqlen, dim, n, groups, dtype, opts, seed=17)
    lane = run("triton", kw, seq_idx, softplus, weights, dict(tuning, bwd_variant="lane"))
    chunk = run("triton", kw, seq_idx, softplus, weights, dict(tuning, bwd_variant="chunk"))
    ref = run("torch", kw, seq_idx, softplus, weights, {})
    tol_chunk, tol_torch = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    assert lane.keys() == chunk.keys() == ref.keys()
    for name in ref:
        assert lane[name].dtype == chunk[name].dtype and lane[name].shape == chunk[name].shape, name
        err = rel_err(lane[name], chunk[name])
        assert err <= tol_chunk, f"{name}: relative error {err:.2e} against the chunk backward > {tol_chunk:.0e}"
        err = rel_err(lane[name], ref[name])
        assert err <= tol_torch, f"{name}: relative error {err:.2e} against the torch path > {tol_torch:.0e}"


def test_backward_variant_routing(monkeypatch):
    """The chunk backward by default; the lane one on request where it applies (N <= 16, the warp's 32 channels (one
    lane each) or 16 (two lanes each, from 4 states) dividing a group); asking for it elsewhere, or for an unknown
    variant or lane count, is refused by name."""
    from seqlab.ops.triton import selective_scan as module

    monkeypatch.setattr(module, "TUNING", {})
    assert module._bwd_variant(16, 4096, 1) == "chunk"
    monkeypatch.setattr(module, "TUNING", {"bwd_variant": "lane"})
    assert module._bwd_variant(16, 4096, 1) == "lane"
    assert module._bwd_variant(3, 64, 2) == "lane"
    assert module._lane_bwd_parts(16) == 1
    for n, dim, groups in [(32, 4096, 1), (16, 48, 1), (16, 64, 4)]:  # above 16 states; no whole warp per group
        with pytest.raises(ValueError, match="lane backward needs N <= 16"):
            module._bwd_variant(n, dim, groups)
    monkeypatch.setattr(module, "TUNING", {"bwd_variant": "lane", "lane_bwd_parts": 2})
    assert module._bwd_variant(16, 64, 4) == "lane"  # 16 channels a group: two lanes per channel
    assert module._lane_bwd_parts(16) == 2 and module._lane_bwd_parts(2) == 1
    with pytest.raises(ValueError, match="multiple of 32"):
        module._bwd_variant(2, 64, 4)  # two states: one lane per channel, 32 channels a warp
    monkeypatch.setattr(module, "TUNING", {"bwd_variant": "lane", "lane_bwd_parts": 4})
    with pytest.raises(ValueError, match="lane_bwd_parts"):
        module._bwd_variant(16, 4096, 1)
    monkeypatch.setattr(module, "TUNING", {"bwd_variant": "tile"})
    with pytest.raises(ValueError, match="bwd_variant"):
        module._bwd_variant(16, 4096, 1)


@triton.jit
def _scatter_probe(x_ptr, sums_ptr, xor_ptr, M: tl.constexpr, WIDTH: tl.constexpr, SHFL_ASM: tl.constexpr):
    lane = tl.arange(0, 32)
    vals = ()
    for m in tl.static_range(M):
        vals = vals + (tl.load(x_ptr + m * 32 + lane),)
    tl.store(sums_ptr + lane, _lane_reduce_scatter(vals, lane, SHFL_ASM, WIDTH))
    tl.store(xor_ptr + lane, _lane_xor(vals[0], 4, SHFL_ASM))


@pytest.mark.parametrize("m,width", [(32, 32), (16, 32), (2, 32), (1, 32), (16, 16), (8, 16), (1, 16)])
def test_lane_reduce_scatter_leaves_each_lane_its_sum(m, width):
    """Lane i ends with the sum over its group of `width` lanes of value (i % width) m / width; the exchange with
    lane ^ 4 moves whole values."""
    from seqlab.ops._common import triton_interpreting

    gen = torch.Generator().manual_seed(m * width)
    x = torch.randn(m, 32, generator=gen).to(DEVICE)
    sums, xored = torch.empty(32, device=DEVICE), torch.empty(32, device=DEVICE)
    _scatter_probe[(1,)](x, sums, xored, M=m, WIDTH=width, SHFL_ASM=not triton_interpreting(), num_warps=1)
    lanes = torch.arange(32, device=DEVICE)
    group_sums = x.double().view(m, 32 // width, width).sum(2)  # (m, groups)
    expected = group_sums[(lanes % width) * m // width, lanes // width].float()
    torch.testing.assert_close(sums, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(xored, x[0][lanes ^ 4])
