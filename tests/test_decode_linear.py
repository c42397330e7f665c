"""seqlab.ops.decode_linear: the decode step's linear layers equal F.linear (+ residual) on every path.

The Triton branch needs CUDA tensors (its kernel is tested in test_small_batch_linear.py); here the fallbacks,
the residual inside addmm, autograd through them, and the kernel choice. float32: exact to 1e-6 relative.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

dl = importlib.import_module("seqlab.ops.decode_linear")  # the module (seqlab.ops binds the function's name)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_equals_linear_plus_residual(with_bias, with_residual):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, generator=gen)
    w, b = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    res = torch.randn(3, 1, 24, generator=gen) if with_residual else None
    out = dl.decode_linear(x, w, b if with_bias else None, res)
    ref = F.linear(x, w, b if with_bias else None) + (res if with_residual else 0)
    assert out.shape == (3, 1, 24)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_gradients_flow_through_the_fused_residual():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, generator=gen, requires_grad=True)
    res = torch.randn(4, 5, generator=gen, requires_grad=True)
    dl.decode_linear(x, w, None, res).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, res)]
    for t in (x, w, res):
        t.grad = None
    (F.linear(x, w) + res).square().sum().backward()
    for g, t in zip(grads, (x, w, res)):
        torch.testing.assert_close(g, t.grad)


def test_mixed_dtypes_under_autocast_keep_the_separate_add():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    w = torch.randn(4, 8)
    res = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dl.decode_linear(x, w, None, res)
        ref = F.linear(x, w) + res
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_the_triton_path_applies_only_to_16bit_cuda_tensors_without_grad(monkeypatch):
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    assert not dl._triton_applies(x, w, None, None)  # a CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert dl._triton_applies(x, w, None, None) == (dl.triton_entry(*dl._ENTRY) is not None)
    assert not dl._triton_applies(x, w, torch.zeros(4, dtype=torch.bfloat16), None)  # bias
    assert not dl._triton_applies(x.float(), w.float(), None, None)  # float32
    assert not dl._triton_applies(torch.randn(dl.MAX_ROWS + 1, 8, dtype=torch.bfloat16), w, None, None)
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "torch")
    assert not dl._triton_applies(x, w, None, None)


def test_the_choice_is_forced_by_the_environment_and_never_timed_while_recording(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "triton")
    assert dl._choose(x, w, None) == "triton"
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "auto")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(dl, "_CHOICE", {})
    assert dl._choose(x, w, None) == "torch" and dl._CHOICE == {}


def test_project_calls_a_hooked_layer_as_its_module():
    """Tensor parallelism converts inputs in module hooks: a hooked layer must not be bypassed by the decode path."""
    from torch import nn

    from seqlab.mixers.base import project

    layer = nn.Linear(8, 4, bias=False)
    seen = []
    layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x, res = torch.randn(2, 1, 8), torch.randn(2, 1, 4)
    out = project(layer, x, res, few_rows=True)
    assert seen == [(2, 1, 8)]
    torch.testing.assert_close(out, res + F.linear(x, layer.weight))
