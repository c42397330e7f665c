"""The GPU benchmark scripts' plumbing that runs without a GPU: gpu_check's case processes and kernels.py's
shape list."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the path without CUDA (with one the cases run)")
def test_gpu_check_cases_in_processes_report_a_case_that_produced_no_result():
    """Without CUDA each case's process exits before checking anything: every case then counts as a failed check
    that names it and keeps the process's output, never as a pass."""
    gpu_check = _load("gpu_check")
    gpu_check.run_in_processes([0, 3], processes=2)
    assert [c["case"] for c in gpu_check.CHECKS] == ["case 0", "case 3"]
    assert not any(c["ok"] for c in gpu_check.CHECKS) and all("error" in c for c in gpu_check.CHECKS)


def test_kernels_shapes_parse_and_bad_ones_are_named():
    kernels = _load("kernels")
    assert kernels.parse_shape("8x2048") == (8, 2048) and kernels.parse_shape("1X65536") == (1, 65536)
    with pytest.raises(SystemExit, match="--shapes: expected BATCHxSEQLEN items like 8x2048, got '8-2048'"):
        kernels.parse_shape("8-2048")


def test_kernels_state_sizes_parse_and_bad_ones_are_named():
    kernels = _load("kernels")
    assert kernels.parse_positive("128", "--states") == 128
    for bad in ("0", "-16", "n64"):
        with pytest.raises(SystemExit, match=f"--states: expected positive integers, got '{bad}'"):
            kernels.parse_positive(bad, "--states")


def test_kernels_scan_sweep_list_parses_and_bad_ones_are_named():
    kernels = _load("kernels")
    assert kernels.parse_tuning_list('[{}, {"BWD_MAXNREG": 168}]') == [{}, {"BWD_MAXNREG": 168}]
    for bad in ('{"BWD_MAXNREG": 168}', "[1, 2]", "[{"):
        with pytest.raises(SystemExit, match="--scan-sweep: expected a JSON list of objects"):
            kernels.parse_tuning_list(bad)


def test_decode_gemm_tiles_names_bad_rows_and_the_missing_gpu(monkeypatch):
    """Row counts outside 1..MAX_ROWS are refused by name before anything runs; without CUDA the script says it
    needs a GPU instead of failing inside a CUDA-graph capture."""
    tiles = _load("decode_gemm_tiles")
    monkeypatch.setattr("sys.argv", ["decode_gemm_tiles.py", "64", "0", "x"])
    with pytest.raises(SystemExit, match="expected row counts from 1 to 128, --breakdown and --once, got 0 x"):
        tiles.main()
    if not tiles.torch.cuda.is_available():
        monkeypatch.setattr("sys.argv", ["decode_gemm_tiles.py", "64", "--breakdown"])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            tiles.main()


def test_decode_step_sweep_fused_tiles_fit_the_kernel(monkeypatch):
    """Every fused dt_proj + step tile can run the kernel's tl.dot (16 rows and channels at least), holds 8..128
    states a thread per loop step, and differs from the others; without CUDA the script says it needs a GPU."""
    sweep = _load("decode_step_sweep")
    keys = {tuple(sorted(t.items())) for t in sweep.FUSED_TILES}
    assert len(keys) == len(sweep.FUSED_TILES) > 0
    for t in sweep.FUSED_TILES:
        assert t["BLOCK_B"] >= 16 and t["BLOCK_D"] >= 16, t
        assert 8 <= t["BLOCK_B"] * t["BLOCK_D"] * t["BLOCK_N"] // (32 * t["WARPS"]) <= 128, t
    if not sweep.torch.cuda.is_available():
        monkeypatch.setattr("sys.argv", ["decode_step_sweep.py", "--fused"])
        assert sweep.main() == 2


def test_decode_prefetch_variants_are_checked_by_name_and_the_scripts_need_a_gpu(monkeypatch):
    """A variant names a schedule and optionally +evict_first; anything else is refused by name. Without CUDA
    both prefetch scripts say they need a GPU."""
    from seqlab.errors import InputError
    from seqlab.mixers import base
    from seqlab.ops.triton import decode

    script = _load("decode_prefetch")
    monkeypatch.setitem(base.DECODE_PREFETCH, "schedule", "off")
    monkeypatch.setitem(decode.TUNING, "state_policy", "")
    monkeypatch.setitem(base.FUSED_DECODE_KERNELS, "dt_proj_step", "auto")
    script.apply_variant("split+evict_first+step_pair")
    assert base.DECODE_PREFETCH["schedule"] == "split" and decode.TUNING["state_policy"] == "evict_first"
    assert base.FUSED_DECODE_KERNELS["dt_proj_step"] is False
    script.apply_variant("off")  # options not named return to their defaults
    assert decode.TUNING["state_policy"] == ""
    assert base.FUSED_DECODE_KERNELS["dt_proj_step"] == script.DEFAULT_STEP_KIND is False
    script.apply_variant("off+step_fused")
    assert base.FUSED_DECODE_KERNELS["dt_proj_step"] is True
    monkeypatch.setitem(base.FUSED_DECODE_KERNELS, "layer", False)
    script.apply_variant("off+layer")
    assert base.FUSED_DECODE_KERNELS["layer"] is True
    script.apply_variant("off")
    assert base.FUSED_DECODE_KERNELS["layer"] is script.DEFAULT_LAYER
    with pytest.raises(InputError, match="one of"):
        script.apply_variant("later")
    with pytest.raises(SystemExit, match="unknown option 'evict_last'"):
        script.apply_variant("own+evict_last")
    probe = _load("l2_prefetch_probe")
    if not script.torch.cuda.is_available():
        monkeypatch.setattr("sys.argv", ["decode_prefetch.py"])
        assert script.main() == 2
        monkeypatch.setattr("sys.argv", ["l2_prefetch_probe.py"])
        assert probe.main() == 2
        monkeypatch.setattr("sys.argv", ["decode_layer.py"])
        assert _load("decode_layer").main() == 2


def test_official_layout_matches_the_official_packages_shapes():
    """seqlab's (B, L, D) and (B, L, 1, N) scan inputs become mamba-ssm's (B, D, L) and (B, N, L), contiguous, the
    same numbers at transposed positions."""
    official = _load("official_mamba")
    b, L, d, n = 2, 5, 3, 4
    u, delta, z = torch.randn(b, L, d), torch.randn(b, L, d), torch.randn(b, L, d)
    B, C = torch.randn(b, L, 1, n), torch.randn(b, L, 1, n)
    A, D, bias = -torch.rand(d, n), torch.ones(d), torch.zeros(d)
    u_o, delta_o, A_o, B_o, C_o, D_o, z_o, bias_o = official.official_layout(u, delta, A, B, C, D, z, bias)
    assert u_o.shape == (b, d, L) and B_o.shape == (b, n, L) and all(x.is_contiguous() for x in (u_o, B_o, z_o))
    assert u_o[1, 2, 4] == u[1, 4, 2] and z_o[0, 1, 3] == z[0, 3, 1] and delta_o[1, 0, 2] == delta[1, 2, 0]
    assert B_o[1, 3, 2] == B[1, 2, 0, 3] and C_o[0, 2, 4] == C[0, 4, 0, 2]
    assert torch.equal(A_o, A) and A_o.data_ptr() != A.data_ptr() and torch.equal(D_o, D) and torch.equal(bias_o, bias)


def test_official_mamba_names_bad_arguments():
    official = _load("official_mamba")
    with pytest.raises(SystemExit):
        official.main(["--sections", "scan,decode"])
    with pytest.raises(SystemExit):
        official.main(["--shapes", "8-2048"])


def test_official_build_covers_every_backward_variant_once():
    """The backward variants compiled (their .cu files) and the ones defined as refusals are together every (input,
    weight) pair the extension dispatches to, with no pair in both."""
    build = _load("official_build")
    itypes = {"fp32": "float", "fp16": "c10::Half", "bf16": "c10::BFloat16"}
    wtypes = {"real": "float", "complex": "complex_t"}
    compiled = set()
    for name in build.SCAN_FILES:
        if name.startswith("selective_scan_bwd_"):
            itype, wtype = name.removeprefix("selective_scan_bwd_").removesuffix(".cu").split("_")
            compiled.add((itypes[itype], wtypes[wtype]))
    skipped = set(build.SKIPPED_BWD)
    assert not compiled & skipped
    assert compiled | skipped == {(i, w) for i in itypes.values() for w in wtypes.values()}
    source = build.skipped_variants_source()
    for itype, wtype in skipped:
        assert f"selective_scan_bwd_cuda<{itype}, {wtype}>" in source
