"""The decode-step GEMM (seqlab.ops.triton.small_batch_linear) against torch's x @ Wᵀ (+ residual), with the
fused RMSNorm against rms_norm(x) @ Wᵀ (+ residual) computed in float64, and with the conv step in its epilogue
against the GEMM followed by seqlab.ops.conv.conv_step_ref.

Runs under TRITON_INTERPRET=1 on the CPU or natively on CUDA. Tolerances: float32 inputs, relative error <= 1e-5
(IEEE products, split-K sums in another order, the norm's row scale applied after the sum); bfloat16 inputs,
<= 1e-2 (x ⊙ norm weight rounded to bfloat16 once for the dot, one rounding of the float32 output). Conv states:
the shifted slots are copies (equal bits), the appended slot is the GEMM output (the tolerance of the output).
"""

from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not (_INTERPRET or torch.cuda.is_available()),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,k", [(1, 48, 96), (5, 200, 300), (64, 64, 256)])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_torch_in_float32(m, n, k, split, with_residual):
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    gen = torch.Generator().manual_seed(m * n + split)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    res = torch.randn(m, n, generator=gen).to(DEVICE) if with_residual else None
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, STAGES=2, WARPS=4)
    ref = x @ w.t() + (res if res is not None else 0)
    outs = []
    for _ in range(3):  # later calls find the counters zeroed again, and give the same bits (fixed-order sums)
        out = small_batch_linear_triton(x, w, res, cfg)
        assert out.shape == (m, n) and out.dtype == x.dtype
        assert rel_err(out, ref) <= 1e-5
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_bfloat16_strided_input_and_default_config():
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2 * 160, generator=gen).to(DEVICE, torch.bfloat16)[:, ::2]  # a strided view (8, 160)
    w = torch.randn(96, 160, generator=gen).to(DEVICE, torch.bfloat16)
    res = torch.randn(8, 96, generator=gen).to(DEVICE, torch.bfloat16)
    out = small_batch_linear_triton(x, w, res)
    ref = x.float() @ w.float().t() + res.float()
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2


def rms_norm_reference(x, weight, eps):
    """float64 rms_norm of the inputs' values (seqlab.mixers.norm.rms_norm without its roundings)."""
    x = x.double()
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_fused_rms_norm_matches_norm_then_gemm(m, split, dtype):
    """Both forms of the norm in each case: weighted without a residual, weightless with one."""
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    n, k, eps = 48, 200, 1e-5  # K=200 in BLOCK_K=32 slices: split 3 gives slices of 96, 96, 8
    gen = torch.Generator().manual_seed(m * 7 + split)
    x = (3 * torch.randn(m, k, generator=gen)).to(DEVICE, dtype)  # not unit RMS: the scale matters
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    g = (1 + 0.5 * torch.randn(k, generator=gen)).to(DEVICE)  # a float32 parameter, as models keep them
    res = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, STAGES=2, WARPS=4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for norm_weight, residual in ((g, None), (None, res)):
        out = small_batch_linear_triton(x, w, residual, cfg, normalize=True, norm_weight=norm_weight, norm_eps=eps)
        ref = rms_norm_reference(x, norm_weight, eps) @ w.double().t() + (0 if residual is None else residual.double())
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) <= tol, (norm_weight is not None, residual is not None)


def test_fused_rms_norm_with_split_k_gives_the_same_bits_every_call():
    """The partial sums of squares are added in slot order like the partial products: no run-to-run variation."""
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 200, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(40, 200, generator=gen).to(DEVICE, torch.bfloat16)
    g = torch.randn(200, generator=gen).to(DEVICE, torch.bfloat16)
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=4, STAGES=2, WARPS=4)
    outs = [small_batch_linear_triton(x, w, None, cfg, normalize=True, norm_weight=g, norm_eps=1e-6)
            for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-f32state"])
@pytest.mark.parametrize("channels", [40, 64])
def test_conv_epilogue_matches_gemm_then_conv_step(width, split, dtype, state_dtype, channels):
    """Mamba's in_proj then conv step over two steps with the state carried: the first C columns through the conv,
    the rest plain; with and without the norm, bias on the first step only. C = 40 (not a multiple of BLOCK_N: one
    output tile holds both kinds of column, its state runs masked per channel) and C = 64 (whole tiles: the state
    runs read and written as vectors); N = 72 is not a multiple of BLOCK_N either."""
    from seqlab.ops.conv import conv_step_ref
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    m, n, k = 5, 72, 96
    gen = torch.Generator().manual_seed(width * 10 + split + channels)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    conv_w = (0.5 * torch.randn(channels, width, generator=gen)).to(DEVICE, dtype)
    conv_b = torch.randn(channels, generator=gen).to(DEVICE, dtype)
    state = torch.randn(m, channels, width - 1, generator=gen).to(DEVICE, state_dtype)
    state_ref = state.clone()
    g = (1 + 0.5 * torch.randn(k, generator=gen)).to(DEVICE)
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, STAGES=2, WARPS=4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for step, (bias, normalize) in enumerate(((conv_b, False), (None, True))):
        x = (2 * torch.randn(m, k, generator=gen)).to(DEVICE, dtype)
        before = state.clone()
        out = small_batch_linear_triton(x, w, None, cfg, normalize=normalize, norm_weight=g if normalize else None,
                                        conv=(state, conv_w, bias))
        x_in = rms_norm_reference(x, g, 1e-5).to(dtype) if normalize else x
        y = (x_in.double() @ w.double().t()).to(dtype)
        u_ref = conv_step_ref(state_ref, y[:, :channels], conv_w, bias, activation="silu")
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out[:, :channels], u_ref) <= tol, step
        assert rel_err(out[:, channels:], y[:, channels:]) <= tol, step
        assert torch.equal(state[:, :, :-1], before[:, :, 1:]), step  # shifted: copies
        assert rel_err(state[:, :, -1], state_ref[:, :, -1]) <= tol, step
        state_ref.copy_(state)  # carry the kernel's state: each step is compared from the same start


def test_conv_epilogue_refuses_what_it_cannot_fold():
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    x, w = torch.zeros(2, 8), torch.zeros(6, 8)
    state, conv_w = torch.zeros(2, 4, 3), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="conv: expected a .C, W. weight with 2 <= W <= 4"):
        small_batch_linear_triton(x, w, conv=(torch.zeros(2, 4, 4), torch.zeros(4, 5), None))
    with pytest.raises(ValueError, match="conv: expected a contiguous state of shape"):
        small_batch_linear_triton(x, w, conv=(torch.zeros(2, 4, 2), conv_w, None))
    with pytest.raises(ValueError, match="residual: not taken with conv"):
        small_batch_linear_triton(x, w, torch.zeros(2, 6), conv=(state, conv_w, None))


def test_candidate_configs_start_with_the_default_and_are_distinct(monkeypatch):
    from seqlab.ops.triton import small_batch_linear as sbl

    for m, n, k in ((1, 8192, 2048), (64, 160, 4096), (128, 4096, 128)):
        configs = sbl.candidate_configs(m, n, k)
        assert configs[0]["BLOCK_N"] == sbl.default_config(m, n, k)["BLOCK_N"] and 3 <= len(configs) <= 9
        assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)
        assert all(c["SPLIT_K"] == sbl._effective_split(k, c["BLOCK_K"], c["SPLIT_K"]) for c in configs)
    monkeypatch.setitem(sbl.TUNING, "BLOCK_N", 32)  # a benchmark's override leaves nothing to choose
    assert sbl.candidate_configs(1, 8192, 2048) == [sbl.default_config(1, 8192, 2048)]


def test_candidates_include_a_one_wave_version_of_tiles_that_take_two(monkeypatch):
    """Mamba 1.4b's out_proj at 64 rows: 256 programs of 4 x 32 KB stages, one per SM of 132, run in two waves; a
    candidate with the same tile and fewer stages fits two per SM. At one row the default already fits."""
    from seqlab.ops.triton import small_batch_linear as sbl

    monkeypatch.setattr(sbl, "sm_count", lambda: 132)
    base = sbl.default_config(64, 2048, 4096)
    assert base["STAGES"] == 4 and base["SPLIT_K"] == 8
    wave = [c for c in sbl.candidate_configs(64, 2048, 4096)
            if {**c, "STAGES": base["STAGES"]} == base and c["STAGES"] < base["STAGES"]]
    assert len(wave) == 1 and 2 * wave[0]["STAGES"] * (64 + 64) * 128 * 2 <= sbl.SHARED_BYTES_PER_SM
    assert sbl._one_wave(sbl.default_config(1, 2048, 4096), 1, 2048, 4096) is None
    assert sbl._one_wave({**base, "STAGES": 2, "SPLIT_K": 64, "BLOCK_K": 64}, 64, 2048, 4096) is None  # none fits


def test_transient_workspaces_drop_only_what_the_block_made():
    from seqlab.ops.triton import small_batch_linear as sbl

    x, w = torch.randn(2, 64).to(DEVICE), torch.randn(40, 64).to(DEVICE)
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, STAGES=2, WARPS=4)
    sbl.small_batch_linear_triton(x, w, None, cfg)
    before = set(sbl._WORKSPACES)
    with sbl.transient_workspaces():
        sbl.small_batch_linear_triton(x, w, None, cfg)
        sbl.small_batch_linear_triton(x, w, None, {**cfg, "BLOCK_N": 16})
        assert len(sbl._WORKSPACES) == len(before) + 1
    assert set(sbl._WORKSPACES) == before


def test_refuses_a_norm_weight_without_normalize_or_of_the_wrong_length():
    from seqlab.ops.triton.small_batch_linear import small_batch_linear_triton

    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="norm_weight: given without normalize"):
        small_batch_linear_triton(x, w, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(8,\)"):
        small_batch_linear_triton(x, w, normalize=True, norm_weight=torch.ones(7))


def test_refuses_more_rows_than_it_tiles():
    from seqlab.ops.triton.small_batch_linear import MAX_ROWS, small_batch_linear_triton

    with pytest.raises(ValueError, match="x: expected at most"):
        small_batch_linear_triton(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))


_LAUNCHED: list = []


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


def test_launched_kernels_compile_for_sm90():
    """Every specialisation launched above, and each with programmatic dependent launch (a Hopper GPU's, which the
    interpreter cannot run), lowers for sm_90."""
    from triton_compile import assert_launched_compile_for_sm90, with_constexpr

    assert_launched_compile_for_sm90(_LAUNCHED + with_constexpr(_LAUNCHED, "PDL", True))
