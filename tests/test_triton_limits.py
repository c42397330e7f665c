"""Sizes the fused kernels are not built for: a clear error when Triton is asked for, the torch path on auto."""

import importlib

import pytest
import torch

from seqlab.errors import InputError
from seqlab.ops import selective_scan, ssd

pytest.importorskip("triton")
ssd_module = importlib.import_module("seqlab.ops.ssd")  # the module; ``seqlab.ops.ssd`` is the function


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_selective_scan_rejects_a_state_too_large_for_the_kernel(interpreter):
    b, l, d, n = 1, 4, 2, 300
    u, delta = torch.randn(b, l, d), torch.randn(b, l, d)
    with pytest.raises(InputError, match=r"^A: expected d_state N <= 256 .* got d_state N = 300"):
        selective_scan(u, delta, -torch.rand(d, n), torch.randn(b, l, n), torch.randn(b, l, n), backend="triton")


@pytest.mark.parametrize("p,n,argument", [(160, 16, "x"), (16, 300, "B")])
def test_ssd_rejects_heads_or_states_too_large_for_the_kernels(interpreter, p, n, argument):
    b, l, h = 1, 4, 2
    x, dt = torch.randn(b, l, h, p), torch.randn(b, l, h)
    B, C = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    with pytest.raises(InputError, match=f"^{argument}: expected"):
        ssd(x, dt, -torch.rand(h), B, C, backend="triton")


def test_ssd_auto_takes_the_torch_path_for_sizes_the_kernels_do_not_fit(monkeypatch):
    monkeypatch.setattr(ssd_module, "select_backend", lambda backend, *a, **k: "triton")  # as on a GPU
    b, l, h, p, n = 1, 8, 2, 160, 8
    x, dt = torch.randn(b, l, h, p), torch.randn(b, l, h)
    B, C, A = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n), -torch.rand(h)
    torch.testing.assert_close(ssd(x, dt, A, B, C, backend="auto"), ssd(x, dt, A, B, C, backend="ref"),
                               rtol=1e-4, atol=1e-4)
