"""The elementwise helpers shared by the Triton kernels, against float64 (interpreter on the CPU, native on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from seqlab.ops.triton.jit_math import fast_log, softplus  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not (_INTERPRET or torch.cuda.is_available()),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, softplus(x), mask=offs < n)


def test_softplus_keeps_float32_relative_precision_from_tiny_to_large_steps():
    """From x = -87 to 50, relative error within what float32 exp itself allows: the GPU's exp is exact to a few
    ulps of x log2(e), ~1e-7 |x| relative (the plain log(1 + e^x) is off by 100% below x = -17 and by ~1e-3 around
    x = -10); no NaN or inf."""
    x = torch.cat([torch.linspace(-87.0, 50.0, 8191), torch.tensor([-10.0, -2.0, -2.0001, 0.0, 20.0, 20.001])])
    y = torch.empty_like(x)
    x, y = x.to(DEVICE), y.to(DEVICE)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = F.softplus(x.double().cpu())
    rel = (y.double().cpu() - ref).abs() / ref
    allowed = 1e-6 + 2e-7 * x.double().cpu().abs()
    assert torch.isfinite(y).all() and (rel <= allowed).all(), (rel / allowed).max().item()


@triton.jit
def _fast_log_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    tl.store(y_ptr + offs, fast_log(x), mask=offs < n)


def test_fast_log_is_within_a_few_float32_ulps_of_log():
    """From 1 to 1e30 (softplus takes it on 1 + e^x >= 1 + e^-2): absolute error within 2e-7 near 1 and 1e-6
    relative elsewhere (lg2.approx on the GPU; tl.log under the interpreter)."""
    x = torch.cat([torch.linspace(1.0, 2.0, 4097), torch.logspace(0.0, 30.0, 4096), torch.tensor([1.1353352832366127])])
    y = torch.empty_like(x)
    x, y = x.to(DEVICE), y.to(DEVICE)
    _fast_log_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.double().cpu().log()
    err = (y.double().cpu() - ref).abs()
    assert torch.isfinite(y).all() and (err <= 2e-7 + 1e-6 * ref.abs()).all(), (err - 1e-6 * ref.abs()).max().item()
