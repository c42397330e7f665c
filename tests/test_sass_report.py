"""benchmarks/sass_report.py compiles a Triton kernel for sm_90 without a GPU and reads the cubin back: registers,
occupancy and an instruction mix that follows the launch's specialisations (aligned, divisible integers let the
compiler vectorise loads) and the register cap."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="needs Triton's NVIDIA backend (ptxas, cuobjdump)")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sass_report.py"
KERNEL = "seqlab.ops.triton.decode:_selective_step_kernel"
CONST = "A_IS_LOG=1,HAS_D=1,HAS_Z=1,HAS_BIAS=1,SOFTPLUS=1,ROWS=1,BLOCK_D=32,BLOCK_N=16,BLOCK_R=64"
PTRS = "A_ptr=fp32,D_ptr=fp32,bias_ptr=fp32"
STRIDES = "BATCH=64,DIM=4096,G=1,N=16,R=128,sx_b=8192,sx_d=1,sdt_b=4096,sdt_d=1,sz_b=8192,sz_d=1," \
          "sB_b=160,sB_g=16,sB_n=1,sC_b=160,sC_g=16,sC_n=1"


def report(*extra: str) -> dict:
    res = subprocess.run([sys.executable, str(SCRIPT), KERNEL, "--const", CONST, "--ptr", PTRS, "--warps", "1",
                          "--json", *extra], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_reports_registers_occupancy_and_the_instruction_mix():
    plain, launched = report(), report("--int", STRIDES)
    for r in (plain, launched):
        assert 0 < r["registers"] <= 255 and r["ctas_per_sm"] >= 1 and r["warps_per_sm"] == r["ctas_per_sm"]
        assert r["instructions"]["total"] > r["instructions"]["mufu"] > 0  # exp and softplus on the MUFU
    # unit strides become constants and sizes divisible by 16 are known: fewer, wider loads
    assert launched["instructions"]["global_load"] < plain["instructions"]["global_load"]


def test_a_register_cap_is_honoured():
    assert report("--int", STRIDES, "--maxnreg", "32")["registers"] <= 32


def test_an_unknown_constexpr_is_named():
    res = subprocess.run([sys.executable, str(SCRIPT), KERNEL, "--const", "NOT_A_FLAG=1"], capture_output=True,
                         text=True, timeout=240)
    assert res.returncode != 0 and "NOT_A_FLAG" in res.stderr


def test_softplus_takes_the_special_function_log(tmp_path):
    """Compiled for the GPU, the step kernel's softplus takes its log from the MUFU (lg2), not libdevice's
    polynomial log (~20 instructions a call)."""
    sass = tmp_path / "step.sass"
    report("--int", STRIDES, "--sass", str(sass))
    text = sass.read_text()
    assert "MUFU.LG2" in text and "MUFU.EX2" in text


@pytest.mark.parametrize("prefetch", [0, 1])
def test_the_layer_step_launch_compiles_for_sm_90(prefetch, tmp_path):
    """Mamba's one-launch layer step at Mamba-1.4b's shape and its default tiles (8 warps, one program per SM): a
    string constexpr (the dot precision) and a float argument (eps) pass through; tensor-core GEMMs, one program
    fits an SM; with PREFETCH the bulk L2 prefetches are there. (Spills depend on the compiler: none with Triton
    3.6, 37 instructions with 3.9.)"""
    const = ("DM=2048,DI=4096,N=16,R=128,W=4,HAS_NORM=1,HAS_CONV_BIAS=1,BLOCK_M=64,BLOCK_D=1024,BLOCK_N_IN=64,"
             "BLOCK_K_IN=128,X_SPLIT=16,BLOCK_N_X=32,BLOCK_K_X=64,BLOCK_C=32,BLOCK_R=128,ROWS=32,OUT_SPLIT=2,"
             "BLOCK_N_OUT=32,BLOCK_K_OUT=128,BLOCK_E=1024,CONV_RUN=256,FIRST=0,LAST=6,PERSISTENT=1,"
             f"DOT_PRECISION=tf32,PREFETCH={prefetch}")
    ptrs = ("nw_ptr=fp32,cw_ptr=fp32,cb_ptr=fp32,bdt_ptr=fp32,alog_ptr=fp32,dskip_ptr=fp32,xpart_ptr=fp32,"
            "opart_ptr=fp32,sync_ptr=i32")
    res = subprocess.run([sys.executable, str(SCRIPT), "seqlab.ops.triton.mamba_layer:mamba_layer_step_kernel",
                          "--const", const, "--ptr", ptrs, "--int", "M=64", "--float", "eps", "--warps", "8",
                          "--stages", "4", "--json", "--sass", str(tmp_path / "layer.sass")], capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["instructions"]["tensor"] > 0 and r["ctas_per_sm"] >= 1 and r["registers"] <= 255
    assert ("UBLKPF" in (tmp_path / "layer.sass").read_text()) == bool(prefetch)
