"""Linear attention: the chunked path and the decode step equal the per-timestep recurrence, for every decay kind
(none, per head, per key channel), with and without the RWKV bonus u and the normaliser.

Tolerances: float64 paths agree to 1e-9 (relative); float32 at 1e-4; bf16 inputs within 1e-2 relative error (norm)
of the float32 reference on the same values.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.linear_attention import linear_attention, linear_attention_step

F64 = dict(rtol=1e-9, atol=1e-9)
DECAYS = ["none", "head", "channel"]


def make_inputs(batch=2, seqlen=20, nheads=3, dk=4, dv=5, *, decay="channel", bonus=False, normalize=False,
                initial_state=False, strength=1.0, seed=0, dtype=torch.float64):
    """Random inputs as keyword arguments; ``strength`` scales the log-decays (mean -strength/2 per step)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    kw = dict(q=randn(batch, seqlen, nheads, dk), k=randn(batch, seqlen, nheads, dk),
              v=randn(batch, seqlen, nheads, dv), normalize=normalize)
    if normalize:  # positive features, as a feature map would give
        kw["q"], kw["k"] = kw["q"].exp(), kw["k"].exp()
    if decay != "none":
        shape = (batch, seqlen, nheads) + ((dk,) if decay == "channel" else ())
        kw["g"] = (-strength * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)
    if bonus:
        kw["u"] = randn(nheads, dk)
    if initial_state:
        kw["initial_state"] = randn(batch, nheads, dk, dv + int(normalize)).abs()
    return kw


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------- fast == ref


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 40),
    nheads=st.integers(1, 3),
    dk=st.integers(1, 5),
    dv=st.integers(1, 4),
    chunk_size=st.sampled_from([1, 4, 7, 16, 64]),
    decay=st.sampled_from(DECAYS),
    bonus=st.booleans(),
    normalize=st.booleans(),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_ref(batch, seqlen, nheads, dk, dv, chunk_size, decay, bonus, normalize, initial_state, seed):
    kw = make_inputs(batch, seqlen, nheads, dk, dv, decay=decay, bonus=bonus, normalize=normalize,
                     initial_state=initial_state, seed=seed)
    o_ref, s_ref = linear_attention(**kw, return_final_state=True, backend="ref")
    o, s = linear_attention(**kw, return_final_state=True, chunk_size=chunk_size, backend="torch")
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(s, s_ref, **F64)


@pytest.mark.parametrize("bonus", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_per_channel_decay_with_sub_chunks_matches_ref(bonus, packed):
    # chunks of 64 = 4 sub-chunks of 16: the factored off-diagonal blocks and the dense diagonal blocks
    kw = make_inputs(2, 150, 2, 4, 3, decay="channel", bonus=bonus, initial_state=True, strength=4.0, seed=12)
    seq_idx = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7 + [3] * 113, [0] * 150]) if packed else None
    o_ref, s_ref = linear_attention(**kw, seq_idx=seq_idx, return_final_state=True, backend="ref")
    o, s = linear_attention(**kw, seq_idx=seq_idx, return_final_state=True, chunk_size=64, backend="torch")
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(s, s_ref, **F64)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("bonus", [False, True])
def test_gradients_match_ref_and_pass_gradcheck(decay, bonus):
    kw = make_inputs(1, 7, 2, 3, 2, decay=decay, bonus=bonus, initial_state=True, seed=1)
    names = [n for n in ("q", "k", "v", "g", "u", "initial_state") if n in kw]
    for n in names:
        kw[n].requires_grad_(True)

    def run(backend):
        o, s = linear_attention(**kw, return_final_state=True, chunk_size=3, backend=backend)
        return torch.autograd.grad((o * torch.arange(o.numel()).view_as(o).sin()).sum() + s.sum(),
                                   [kw[n] for n in names])

    for a, b in zip(run("torch"), run("ref")):
        torch.testing.assert_close(a, b, **F64)
    inputs = tuple(kw[n] for n in names)

    def fn(*tensors):
        return linear_attention(**{**kw, **dict(zip(names, tensors))}, chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)


def test_sub_chunk_gradients_match_ref():
    kw = make_inputs(1, 40, 1, 2, 2, decay="channel", bonus=True, initial_state=True, seed=13)
    names = ["q", "k", "v", "g", "u", "initial_state"]
    for n in names:
        kw[n].requires_grad_(True)
    grads = []
    for backend in ("torch", "ref"):
        o, s = linear_attention(**kw, return_final_state=True, chunk_size=32, backend=backend)
        grads.append(torch.autograd.grad(o.sin().sum() + s.sum(), [kw[n] for n in names]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **F64)


def test_normalized_output_is_a_weighted_mean_of_values():
    # Katharopoulos et al. eq. 5: with positive features o_t is a convex combination of v_1..v_t
    kw = make_inputs(1, 12, 1, 3, 1, decay="none", normalize=True, seed=2)
    o = linear_attention(**kw, backend="torch")
    v = kw["v"][..., 0]
    lo, hi = v.cummin(1).values, v.cummax(1).values
    assert (o[..., 0] >= lo - 1e-5).all() and (o[..., 0] <= hi + 1e-5).all()  # up to the eps of q·z + eps


def test_float32_and_bf16_within_stated_bounds():
    kw64 = make_inputs(2, 70, 2, 8, 8, decay="channel", bonus=True, seed=3)
    ref = linear_attention(**kw64, backend="ref")
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw64.items()}
    torch.testing.assert_close(linear_attention(**kw32, backend="torch"), ref.float(), atol=1e-4, rtol=1e-4)
    kw16 = {n: (t.bfloat16() if isinstance(t, torch.Tensor) else t) for n, t in kw64.items()}
    out = linear_attention(**kw16, backend="torch")
    assert out.dtype == torch.bfloat16
    same_values = linear_attention(**{n: (t.double() if isinstance(t, torch.Tensor) else t)
                                      for n, t in kw16.items()}, backend="ref")
    assert relative_error(out, same_values) < 1e-2


# ------------------------------------------------------------------------------------------ stability


@pytest.mark.parametrize("decay", ["head", "channel"])
def test_strong_decays_stay_finite_at_4096(decay):
    # log-decays down to -30 per step: exp(-b) over a chunk of 64 would be exp(1920), far beyond float32
    kw = make_inputs(1, 4096, 2, 4, 4, decay=decay, bonus=True, strength=60.0, seed=4, dtype=torch.float32)
    o, s = linear_attention(**kw, return_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    tail = {n: (t[:, -50:] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t) for n, t in kw.items()}
    # the state forgets so fast that the last 50 positions alone give the same outputs and state
    o_tail, s_tail = linear_attention(**tail, return_final_state=True, backend="ref")
    torch.testing.assert_close(o[:, -40:], o_tail[:, -40:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_tail, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ documents, decode


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("decay", DECAYS)
def test_packed_documents_match_separate_calls(backend, decay):
    kw = make_inputs(1, 23, 2, 3, 4, decay=decay, bonus=True, normalize=decay == "none", initial_state=True,
                     seed=5)
    cuts = [0, 9, 10, 23]  # a one-token document in the middle
    seq_idx = torch.tensor([[0] * 9 + [1] + [2] * 13])
    packed, s_packed = linear_attention(**kw, seq_idx=seq_idx, return_final_state=True, chunk_size=4,
                                        backend=backend)
    outs, state = [], kw["initial_state"]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = {n: (t[:, a:b] if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[1] == 23 else t)
                for n, t in kw.items()}
        part["initial_state"] = kw["initial_state"] if i == 0 else None
        o, state = linear_attention(**part, return_final_state=True, backend="ref")
        outs.append(o)
    torch.testing.assert_close(packed, torch.cat(outs, dim=1), **F64)
    torch.testing.assert_close(s_packed, state, **F64)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("bonus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_decode_steps_match_parallel(decay, bonus, normalize):
    kw = make_inputs(2, 9, 2, 3, 4, decay=decay, bonus=bonus, normalize=normalize, initial_state=True, seed=6)
    parallel, s_parallel = linear_attention(**kw, return_final_state=True, chunk_size=4, backend="torch")
    state = kw["initial_state"].clone()
    steps = []
    for t in range(9):
        g = kw.get("g")
        steps.append(linear_attention_step(state, kw["q"][:, t], kw["k"][:, t], kw["v"][:, t],
                                           None if g is None else g[:, t], kw.get("u"), normalize=normalize))
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel, **F64)
    torch.testing.assert_close(state, s_parallel, **F64)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argument, change",
    [
        ("q", lambda kw: kw.update(q=kw["q"][0])),
        ("k", lambda kw: kw.update(k=kw["k"][:, :, :, :2])),
        ("v", lambda kw: kw.update(v=kw["v"][:, :5])),
        ("v", lambda kw: kw.update(v=kw["v"].float())),
        ("g", lambda kw: kw.update(g=kw["g"][..., :2])),
        ("u", lambda kw: kw.update(u=kw["u"][:1])),
        ("initial_state", lambda kw: kw.update(initial_state=torch.zeros(2, 3, 4, 6, dtype=torch.float64))),
        ("seq_idx", lambda kw: kw.update(seq_idx=torch.zeros(2, 3, dtype=torch.long))),
        ("chunk_size", lambda kw: kw.update(chunk_size=0)),
        ("backend", lambda kw: kw.update(backend="cuda")),
    ],
)
def test_bad_input_is_an_input_error_naming_the_argument(argument, change):
    kw = make_inputs(decay="channel", bonus=True, initial_state=True)
    change(kw)
    with pytest.raises(InputError, match=f"^{argument}:"):
        linear_attention(**kw)


def test_triton_decode_step_without_cuda_or_the_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = make_inputs(seqlen=1, bonus=True, dtype=torch.float32)
    state = torch.zeros(2, 3, 4, 5)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        linear_attention_step(state, kw["q"][:, 0], kw["k"][:, 0], kw["v"][:, 0], g=kw["g"][:, 0], u=kw["u"],
                              backend="triton")
    state = torch.zeros(1, 1, 2, 2)
    with pytest.raises(InputError, match="^state:"):
        linear_attention_step(state, torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.zeros(1, 1, 2))
