"""seqlab.ops.decode_linear: the decode step's linear layers equal F.linear (+ residual), or rms_norm then F.linear,
on every path; decode_linear_conv equals that followed by seqlab.ops.conv.conv_step.

The Triton branch needs CUDA tensors (its kernel is tested in test_small_batch_linear.py); here the fallbacks,
the residual inside addmm, the norm before them, autograd through them, and the choice of kernel and tile shape
(with a stand-in clock). float32: exact to 1e-6 relative; the norm's fallback is seqlab.mixers.norm.rms_norm's
arithmetic, so bfloat16 results are equal.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from stand_in_clock import stand_in_clock

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
    monkeypatch.setattr(dl, "_CHOICE", {})
    monkeypatch.setattr(dl, "_CONFIG", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "triton")
    assert dl._choose(x, w, None) == ("triton", None)  # nothing timed yet: the default tile shape
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "torch")
    assert dl._choose(x, w, None) == ("torch", None)
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "auto")
    assert dl._choose(x, w, None) == ("torch", None) and dl._CHOICE == {} == dl._CONFIG


def _stand_in_clock(monkeypatch, times):
    """The CUDA-graph timing replaced by ``times`` in call order (cuBLAS first, then each candidate tile shape)."""
    return stand_in_clock(monkeypatch, dl, times)


def test_the_fastest_tile_shape_is_remembered_per_shape_and_refused_tiles_are_skipped(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from seqlab.ops.triton.small_batch_linear import candidate_configs

    monkeypatch.setattr(dl, "_CHOICE", {})
    monkeypatch.setattr(dl, "_CONFIG", {})
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "auto")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x, w = torch.randn(2, 2048), torch.randn(8192, 2048)
    configs = candidate_configs(2, 8192, 2048)
    times = [5.0, 4.0, OutOfResources(262144, 232448, "shared memory"), 3.0] + [9.0] * (len(configs) - 3)
    pending = _stand_in_clock(monkeypatch, times)
    assert dl._choose(x, w, None) == ("triton", configs[2]) and not pending
    assert dl._choose(x, w, None) == ("triton", configs[2])  # remembered: no more timing

    # with a norm: its own entry; cuBLAS, then each tile shape with the norm folded in, then with the norm first
    _stand_in_clock(monkeypatch, [1.0] + [2.0] * len(configs) + [1.5] + [3.0] * (len(configs) - 1))
    assert dl._choose(x, w, None, (None, 1e-5)) == ("torch", configs[0])
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "triton")  # forced: still the fastest Triton tile shape
    assert dl._choose(x, w, None, (None, 1e-5)) == ("triton", configs[0])
    assert len(dl._CHOICE) == 2 and [k[-2] for k in dl._CHOICE] == [False, True]

    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "auto")  # the norm run first wins: its kind and tile shape
    _stand_in_clock(monkeypatch, [5.0] + [4.0] * len(configs) + [9.0, 3.0] + [9.0] * (len(configs) - 2))
    assert dl._choose(x[:1], w, None, (None, 1e-5)) == ("triton_prenorm", configs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_on_cpu_equals_rms_norm_then_linear(dtype, with_weight, with_residual):
    from seqlab.mixers.norm import rms_norm

    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(3, 1, 16, generator=gen)).to(dtype)
    w = torch.randn(24, 16, generator=gen).to(dtype)
    g = torch.randn(16, generator=gen) if with_weight else None  # a float32 parameter beside 16-bit activations
    res = torch.randn(3, 1, 24, generator=gen).to(dtype) if with_residual else None
    out = dl.decode_linear(x, w, None, res, norm=(g, 1e-6))
    assert out.shape == (3, 1, 24) and out.dtype == dtype
    assert torch.equal(out, dl.decode_linear(rms_norm(x, g, 1e-6), w, None, res))  # the norm, then as without one
    ref = F.linear(rms_norm(x, g, 1e-6), w) + (res if with_residual else 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: addmm rounds once, linear + residual twice
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() <= tol


def test_norm_under_autocast_and_with_gradients_follows_rms_norm():
    from seqlab.mixers.norm import rms_norm

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, generator=gen, requires_grad=True)
    g = torch.randn(8, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dl.decode_linear(x, w, None, None, norm=(g, 1e-5))
        ref = F.linear(rms_norm(x, g, 1e-5), w)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, g)]
    for t in (x, w, g):
        t.grad = None
    ref.float().square().sum().backward()
    for got, t in zip(grads, (x, w, g)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the kernel under TRITON_INTERPRET=1")
def test_the_triton_branch_fuses_the_norm(monkeypatch):
    """The kernel branch on CPU tensors through the interpreter: the norm reaches the kernel, shapes come back."""
    from seqlab.mixers.norm import rms_norm

    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(3, 1, 64, generator=gen)).to(torch.bfloat16)
    w = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    g, res = torch.randn(64, generator=gen), torch.randn(3, 1, 40, generator=gen).to(torch.bfloat16)
    ref = dl.decode_linear(x, w, None, res, norm=(g, 1e-5))  # rms_norm, then addmm
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, STAGES=2, WARPS=4)
    monkeypatch.setattr(dl, "_choose", lambda *args: ("triton", cfg))
    out = dl.decode_linear(x, w, None, res, norm=(g, 1e-5))
    assert out.shape == (3, 1, 40) and out.dtype == torch.bfloat16
    exact = F.linear(rms_norm(x.double(), g.double(), 1e-5), w.double()) + res.double()
    assert all(((y.double() - exact).norm() / exact.norm()).item() <= 1e-2 for y in (out, ref))


def test_a_norm_weight_of_the_wrong_length_is_named():
    from seqlab.errors import InputError

    with pytest.raises(InputError, match=r"norm: expected a norm weight of shape \(8,\)"):
        dl.decode_linear(torch.randn(2, 8), torch.randn(4, 8), norm=(torch.ones(7), 1e-5))
    with pytest.raises(InputError, match="norm: expected None or a tuple"):
        dl.decode_linear(torch.randn(2, 8), torch.randn(4, 8), norm=torch.ones(8))


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


def _conv_case(gen, m=3, n=24, k=16, channels=10, width=4, dtype=torch.float32):
    x = (2 * torch.randn(m, k, generator=gen)).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    conv_w = torch.randn(channels, width, generator=gen).to(dtype)
    conv_b = torch.randn(channels, generator=gen).to(dtype)
    state = torch.randn(m, channels, width - 1, generator=gen).to(dtype)
    return x, w, state, conv_w, conv_b


@pytest.mark.parametrize("with_norm", [False, True])
def test_linear_conv_equals_linear_then_conv_step(with_norm):
    from seqlab.mixers.norm import rms_norm
    from seqlab.ops.conv import conv_step

    gen = torch.Generator().manual_seed(5)
    x, w, state, conv_w, conv_b = _conv_case(gen)
    g = torch.randn(16, generator=gen)
    norm = (g, 1e-5) if with_norm else None
    state_ref = state.clone()
    u, rest = dl.decode_linear_conv(x, w, state, conv_w, conv_b, norm=norm)
    y = F.linear(rms_norm(x, g, 1e-5) if with_norm else x, w)
    u_ref = conv_step(state_ref, y[:, :10], conv_w, conv_b, activation="silu")
    assert u.shape == (3, 10) and rest.shape == (3, 14)
    torch.testing.assert_close(u, u_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rest, y[:, 10:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the kernel under TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["triton", "triton_prenorm"])
def test_the_triton_branch_folds_the_conv(kind, monkeypatch):
    """The kernel branch on CPU tensors through the interpreter, each kind, against the torch branch."""
    gen = torch.Generator().manual_seed(6)
    x, w, state, conv_w, conv_b = _conv_case(gen, m=5, n=72, k=64, channels=40, dtype=torch.bfloat16)
    g = torch.randn(64, generator=gen)
    state_ref = state.clone()
    u_ref, rest_ref = dl.decode_linear_conv(x, w, state_ref, conv_w, conv_b, norm=(g, 1e-5))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    cfg = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, STAGES=2, WARPS=4)
    monkeypatch.setattr(dl, "_choose", lambda *args: (kind, cfg))
    u, rest = dl.decode_linear_conv(x, w, state, conv_w, conv_b, norm=(g, 1e-5))
    assert u.shape == (5, 40) and rest.shape == (5, 32) and u.dtype == torch.bfloat16
    for got, ref in ((u, u_ref), (rest, rest_ref), (state, state_ref)):
        assert ((got.double() - ref.double()).norm() / ref.double().norm()).item() <= 1e-2


def test_linear_conv_names_the_argument_that_does_not_fit():
    from seqlab.errors import InputError

    gen = torch.Generator().manual_seed(7)
    x, w, state, conv_w, conv_b = _conv_case(gen)
    with pytest.raises(InputError, match="conv_weight: expected a .C, W. tensor with C <= 24"):
        dl.decode_linear_conv(x, w, state, torch.zeros(25, 4))
    with pytest.raises(InputError, match=r"conv_state: expected shape \(3, 10, 3\)"):
        dl.decode_linear_conv(x, w, state[:, :, :2], conv_w)
    with pytest.raises(InputError, match=r"x: expected a \(M, 16\) tensor"):
        dl.decode_linear_conv(x[:, None], w, state, conv_w)
