"""The selective scan's Triton kernels above 16 states (the Mamba-2 paper's state-size comparison runs the scan at
N = 32..128): the chunk kernels take over from the lane forward there, with their own tiles, and still equal
the float64 loop, forward and every gradient (float32, relative error <= 1e-4)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from test_triton_kernels import assert_scan_matches_loop  # noqa: E402
from triton_env import TRITON_MARKS  # noqa: E402

pytestmark = TRITON_MARKS


def test_large_states_take_the_chunk_kernels_with_their_own_tiles():
    from seqlab.ops.triton import selective_scan as module

    assert [module._large_state(n) for n in (3, 16, 17, 64, 128)] == [False, False, True, True, True]
    # the backward's B/C as per-step reads or (N, 8) tiles, whichever measured faster at the state size
    assert [module._bc_per_step(n) for n in (16, 32, 64, 128)] == [True, False, False, True]


@pytest.mark.parametrize("N", [32, 64])
def test_selective_scan_triton_large_states_match_loop(N):
    from seqlab.ops.triton import selective_scan as module

    module.TUNING.clear()
    opts = dict(D=True, z=True, bias=True, init=True, dfinal=True, seq_idx=True)
    assert_scan_matches_loop(module, (2, 21, 8, N, 1), opts, seed=5)


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
