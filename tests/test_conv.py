"""Specification of causal_conv1d and conv_step: the torch path equals the readable loop, decode equals
the parallel form, packed documents equal separate calls, chunked calls with a carried state equal one call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops._common import triton_installed, triton_interpreting
from seqlab.ops.conv import causal_conv1d, conv_step

FAST = settings(max_examples=40, deadline=None)


def make_inputs(Bsz, L, D, W, *, dtype=torch.float64, seed=0, bias=True, state=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, L, D, generator=g, dtype=dtype)
    weight = torch.randn(D, W, generator=g, dtype=dtype)
    b = torch.randn(D, generator=g, dtype=dtype) if bias else None
    s = torch.randn(Bsz, D, W - 1, generator=g, dtype=dtype) if state else None
    return x, weight, b, s


def random_seq_idx(Bsz, L, seed):
    """(B, L) non-decreasing document ids with random document boundaries."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(Bsz, L, generator=g) < 0.3
    starts[:, 0] = False
    return starts.long().cumsum(dim=1).to(torch.int32)


def conv_by_definition(x, weight, bias, activation, initial_state):
    """y_t[d] = bias[d] + sum_k weight[d, k] x_{t-W+1+k}[d], written with nn.Conv1d's left-padded convention."""
    D, W = weight.shape
    conv = torch.nn.Conv1d(D, D, W, groups=D, padding=W - 1, bias=bias is not None, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        if bias is not None:
            conv.bias.copy_(bias)
    prefix = initial_state if initial_state is not None else x.new_zeros(x.shape[0], D, W - 1)
    full = torch.cat([prefix, x.transpose(1, 2)], dim=-1)  # (B, D, W-1+L)
    # output j of the padded conv is the window ending at position j of full; keep the positions of x
    y = conv(full)[..., W - 1 : W - 1 + x.shape[1]].transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


# ---------------------------------------------------------------------------------------------------------
# forward equivalences


@FAST
@given(
    Bsz=st.integers(1, 2),
    L=st.integers(1, 12),
    D=st.integers(1, 5),
    W=st.integers(1, 4),
    bias=st.booleans(),
    silu=st.booleans(),
    state=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_matches_ref(Bsz, L, D, W, bias, silu, state, packed, seed):
    x, weight, b, s = make_inputs(Bsz, L, D, W, seed=seed, bias=bias, state=state)
    seq_idx = random_seq_idx(Bsz, L, seed) if packed else None
    act = "silu" if silu else None
    y_ref, f_ref = causal_conv1d(x, weight, b, act, s, True, seq_idx, backend="ref")
    y, f = causal_conv1d(x, weight, b, act, s, True, seq_idx, backend="torch")
    assert y.shape == (Bsz, L, D) and f.shape == (Bsz, D, W - 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_matches_left_padded_nn_conv1d(backend, W):
    x, weight, b, s = make_inputs(2, 7, 3, W, seed=W)
    for state in (None, s):
        want = conv_by_definition(x, weight, b, "silu", state)
        got = causal_conv1d(x, weight, b, "silu", state, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_final_state_is_last_inputs_even_when_shorter_than_window(backend):
    x, weight, b, s = make_inputs(2, 2, 3, 4, seed=1)  # L=2 < W-1=3
    _, final = causal_conv1d(x, weight, b, initial_state=s, return_final_state=True, backend=backend)
    want = torch.cat([s[:, :, 2:], x.transpose(1, 2)], dim=-1)  # oldest first: one initial input, then x
    torch.testing.assert_close(final, want, rtol=0, atol=0)
    _, final = causal_conv1d(x, weight, b, return_final_state=True, backend=backend)
    torch.testing.assert_close(final[:, :, 0], torch.zeros_like(final[:, :, 0]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_packed_documents_equal_separate_calls(backend):
    D, W = 4, 4
    lengths = [3, 1, 6, 2]
    x, weight, b, s = make_inputs(1, sum(lengths), D, W, seed=2)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)  # (1, L)
    y, final = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend=backend)
    start = 0
    for i, n in enumerate(lengths):
        first = i == 0
        y_doc, f_doc = causal_conv1d(
            x[:, start : start + n], weight, b, "silu", s if first else None, True, backend=backend
        )
        torch.testing.assert_close(y[:, start : start + n], y_doc, rtol=1e-12, atol=1e-12)
        start += n
    torch.testing.assert_close(final, f_doc, rtol=0, atol=0)  # the last document's own state


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("cuts", [(1,), (2, 3), (1, 2, 3, 4), (5,)])
def test_chunked_calls_with_state_carry_equal_one_call(backend, cuts):
    x, weight, b, s = make_inputs(2, 9, 3, 4, seed=3)
    y_full, f_full = causal_conv1d(x, weight, b, "silu", s, True, backend=backend)
    state, ys, start = s, [], 0
    for end in [*cuts, x.shape[1]]:
        y, state = causal_conv1d(x[:, start:end], weight, b, "silu", state, True, backend=backend)
        ys.append(y)
        start = end
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, f_full, rtol=0, atol=0)


@pytest.mark.parametrize("step_backend", ["ref", "torch"])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_decode_steps_match_parallel_forward(step_backend, W):
    x, weight, b, s = make_inputs(2, 6, 5, W, seed=4)
    y_full, f_full = causal_conv1d(x, weight, b, "silu", s, True, backend="ref")
    state = s.clone()
    ys = [conv_step(state, x[:, t], weight, b, "silu", backend=step_backend) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.stack(ys, dim=1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, f_full, rtol=0, atol=0)


def test_decode_step_keeps_state_dtype_and_returns_input_dtype():
    x, weight, b, _ = make_inputs(2, 1, 3, 4, dtype=torch.float32, seed=5)
    state = torch.zeros(2, 3, 3)
    y = conv_step(state, x[:, 0].bfloat16(), weight, b)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(state[:, :, -1], x[:, 0].bfloat16().float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# gradients and low precision


@pytest.mark.parametrize("packed", [False, True])
def test_torch_path_gradcheck_float64(packed):
    x, weight, b, s = make_inputs(2, 5, 3, 3, seed=6)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]) if packed else None
    inputs = tuple(t.requires_grad_() for t in (x, weight, b, s))

    def f(x, weight, b, s):
        y, final = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend="torch")
        return y, final

    assert torch.autograd.gradcheck(f, inputs)


def test_torch_gradients_match_ref_gradients():
    x, weight, b, s = make_inputs(2, 7, 4, 4, seed=7)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    grads = {}
    for backend in ("ref", "torch"):
        inputs = [t.clone().requires_grad_() for t in (x, weight, b, s)]
        y, final = causal_conv1d(*inputs[:3], "silu", inputs[3], True, seq_idx, backend=backend)
        (y.square().sum() + final.sum()).backward()
        grads[backend] = [t.grad for t in inputs]
    for g_ref, g in zip(grads["ref"], grads["torch"]):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_bfloat16_within_bound_of_float32_reference():
    # bf16 inputs, fp32 parameters (the autocast situation): the torch path accumulates in fp32 and rounds
    # once, so the error is at most one bf16 rounding (relative 2^-8) of the output.
    x, weight, b, s = make_inputs(2, 64, 16, 4, dtype=torch.float32, seed=8)
    xb = x.bfloat16()
    y = causal_conv1d(xb, weight, b, "silu", s, backend="torch")
    assert y.dtype == torch.bfloat16
    want = causal_conv1d(xb.float(), weight, b, "silu", s, backend="ref")
    err = (y.float() - want).abs().max().item()
    assert err <= 2**-8 * want.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# errors and backends


def bad_calls():
    x, weight, b, s = make_inputs(2, 5, 3, 4, dtype=torch.float32)
    yield "weight", lambda: causal_conv1d(x, weight[:2], b)
    yield "weight", lambda: causal_conv1d(x, weight.T.contiguous(), b)
    yield "weight", lambda: causal_conv1d(x, weight[:, :0], b)
    yield "bias", lambda: causal_conv1d(x, weight, b[:2])
    yield "activation", lambda: causal_conv1d(x, weight, b, activation="relu")
    yield "initial_state", lambda: causal_conv1d(x, weight, b, initial_state=s[:, :, :2])
    yield "initial_state", lambda: causal_conv1d(x, weight, b, initial_state=s[0])
    yield "x", lambda: causal_conv1d(x[0], weight, b)
    yield "x", lambda: causal_conv1d(x.long(), weight, b)
    yield "x", lambda: causal_conv1d(x[:, :0], weight, b)
    yield "seq_idx", lambda: causal_conv1d(x, weight, b, seq_idx=torch.zeros(2, 4, dtype=torch.long))
    yield "seq_idx", lambda: causal_conv1d(x, weight, b, seq_idx=torch.zeros(2, 5))
    yield "backend", lambda: causal_conv1d(x, weight, b, backend="cuda")
    yield "conv_state", lambda: conv_step(s[:, :, :2], x[:, 0], weight, b)
    yield "x", lambda: conv_step(s, x[:, 0, :2], weight, b)
    yield "weight", lambda: conv_step(s, x[:, 0], weight[:2], b)
    yield "weight", lambda: causal_conv1d(x, weight.to("meta"), b)
    yield "bias", lambda: causal_conv1d(x, weight, b.long())
    yield "initial_state", lambda: causal_conv1d(x, weight, b, initial_state=s.to(torch.complex64))
    yield "activation", lambda: conv_step(s, x[:, 0], weight, b, activation="gelu")


@pytest.mark.parametrize("argument,call", list(bad_calls()))
def test_bad_inputs_raise_input_error_naming_the_argument(argument, call):
    with pytest.raises(InputError) as info:
        call()
    assert argument in str(info.value)


def test_triton_backend_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, b, s = make_inputs(1, 4, 2, 3, dtype=torch.float32)
    with pytest.raises(BackendUnavailable):
        causal_conv1d(x, weight, b, backend="triton")
    with pytest.raises(BackendUnavailable):
        conv_step(s, x[:, 0], weight, b, backend="triton")


def test_auto_on_cpu_never_uses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, b, s = make_inputs(2, 6, 3, 4, dtype=torch.float32)
    torch.testing.assert_close(causal_conv1d(x, weight, b, backend="auto"), causal_conv1d(x, weight, b, backend="ref"))


@pytest.mark.triton
@pytest.mark.skipif(not (triton_installed() and triton_interpreting()), reason="needs triton with TRITON_INTERPRET=1")
def test_triton_dispatch_matches_ref_under_interpreter():
    x, weight, b, s = make_inputs(2, 7, 5, 4, dtype=torch.float32, seed=9)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2, 2]])
    y, final = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend="triton")
    y_ref, final_ref = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend="ref")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)
    state, state_ref = s.clone(), s.clone()
    y = conv_step(state, x[:, 0], weight, b, "silu", backend="triton")
    torch.testing.assert_close(y, conv_step(state_ref, x[:, 0], weight, b, "silu", backend="ref"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
