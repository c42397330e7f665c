"""The selective scan's Triton kernels above 16 states (the Mamba-2 paper's state-size comparison runs the scan at
N = 32..128): the chunk kernels take over from the lane forward there, with their own tiles, and still equal
the float64 loop, forward and every gradient (float32, relative error <= 1e-4)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from test_triton_kernels import _scan_inputs, assert_close, grads_of, leaves, selective_scan_loop  # noqa: E402
from triton_env import TRITON_MARKS  # noqa: E402

pytestmark = TRITON_MARKS


def test_large_states_take_the_chunk_kernels_with_their_own_tiles():
    from seqlab.ops.triton import selective_scan as module

    assert [module._large_state(n) for n in (3, 16, 17, 64, 128)] == [False, False, True, True, True]


@pytest.mark.parametrize("N", [32, 64])
def test_selective_scan_triton_large_states_match_loop(N):
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    u, delta, A, B, C, D, z, bias, h0, seq_idx = _scan_inputs(
        2, 21, 8, N, 1, dict(D=True, z=True, bias=True, init=True, seq_idx=True), seed=5)
    ins = leaves(u, delta, A, B, C, D, z, bias, h0)
    y, hT = module.selective_scan_triton(*ins[:8], True, ins[8], seq_idx)
    ins_ref = leaves(u, delta, A, B, C, D, z, bias, h0)
    y_ref, hT_ref = selective_scan_loop(*ins_ref[:8], True, ins_ref[8], seq_idx)
    assert_close("y", y, y_ref)
    assert_close("final_state", hT, hT_ref)
    gs, gs_ref = grads_of([y, hT], ins, seed=6), grads_of([y_ref, hT_ref], ins_ref, seed=6)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"], gs, gs_ref):
        assert g is not None, f"no gradient for {name}"
        assert_close(f"grad {name}", g, g_ref)


def test_lane_forward_prefetches_less_when_that_saves_a_wave(monkeypatch):
    """B/C four steps ahead (8 programs per SM) unless one step ahead (12 per SM, each program slower) saves a
    poorly filled wave: Mamba-2.8B's d_inner 5120 at batch 8 launches 1280 programs, two waves at 8 per SM on 132
    SMs (the second of 224) and one at 12."""
    from seqlab.ops.triton import selective_scan as module

    monkeypatch.setattr(module, "sm_count", lambda: 132)
    monkeypatch.setattr(module, "TUNING", {})
    assert module._lane_bc_ahead(8 * 4096 // 32) == 4  # 1024 programs: one wave either way
    assert module._lane_bc_ahead(8 * 5120 // 32) == 1  # 1280: 1056 + 224 at 8 per SM, one wave at 12
    assert module._lane_bc_ahead(3 * 1056) == 4  # 3 full waves of 8 per SM against 2 of 12
    assert module._lane_bc_ahead(1500) == 1
    monkeypatch.setattr(module, "TUNING", {"lane_bc_ahead": 3})
    assert module._lane_bc_ahead(8 * 5120 // 32) == 3
