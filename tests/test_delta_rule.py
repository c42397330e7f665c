"""Delta rule: the chunked WY/UT path and the decode step equal the per-timestep recurrence, with and without the
gating decay, across documents, and the update does what the delta rule promises (it writes v_t at key k_t).

Tolerances: float64 paths agree to 1e-9; float32 at 1e-4; bf16 inputs within 1e-2 relative error (norm).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.delta_rule import delta_rule, delta_rule_step

F64 = dict(rtol=1e-9, atol=1e-9)


def make_inputs(batch=2, seqlen=20, nheads=3, dk=4, dv=5, *, gated=True, initial_state=False, strength=1.0, seed=0,
                dtype=torch.float64):
    """Random inputs: L2-normalised keys, β in (0, 1), log-decays of mean -strength/2."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kw = dict(
        q=randn(batch, seqlen, nheads, dk).to(dtype),
        k=F.normalize(randn(batch, seqlen, nheads, dk), dim=-1).to(dtype),
        v=randn(batch, seqlen, nheads, dv).to(dtype),
        beta=torch.rand(batch, seqlen, nheads, generator=g, dtype=torch.float64).to(dtype),
    )
    if gated:
        kw["g"] = (-strength * torch.rand(batch, seqlen, nheads, generator=g, dtype=torch.float64)).to(dtype)
    if initial_state:
        kw["initial_state"] = randn(batch, nheads, dk, dv).to(dtype)
    return kw


def sliced(kw, a, b):
    return {n: (t[:, a:b] if n != "initial_state" else t) for n, t in kw.items()}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 40),
    nheads=st.integers(1, 3),
    dk=st.integers(1, 5),
    dv=st.integers(1, 4),
    chunk_size=st.sampled_from([1, 4, 7, 16, 64]),
    gated=st.booleans(),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_ref(batch, seqlen, nheads, dk, dv, chunk_size, gated, initial_state, seed):
    kw = make_inputs(batch, seqlen, nheads, dk, dv, gated=gated, initial_state=initial_state, seed=seed)
    o_ref, s_ref = delta_rule(**kw, return_final_state=True, backend="ref")
    o, s = delta_rule(**kw, return_final_state=True, chunk_size=chunk_size, backend="torch")
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(s, s_ref, **F64)


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_match_ref_and_pass_gradcheck(gated):
    kw = make_inputs(1, 7, 2, 3, 2, gated=gated, initial_state=True, seed=1)
    names = list(kw)
    for n in names:
        kw[n].requires_grad_(True)

    def run(backend):
        o, s = delta_rule(**kw, return_final_state=True, chunk_size=3, backend=backend)
        weights = torch.arange(o.numel(), dtype=o.dtype).view_as(o).sin()
        return torch.autograd.grad((o * weights).sum() + s.sum(), [kw[n] for n in names])

    for a, b in zip(run("torch"), run("ref")):
        torch.testing.assert_close(a, b, **F64)

    def fn(*tensors):
        return delta_rule(**dict(zip(names, tensors)), chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(kw[n] for n in names))


def test_beta_one_writes_the_value_at_its_key():
    # with β = 1 and no decay, after the update the state returns exactly v_t for the (unit) key k_t
    kw = make_inputs(1, 5, 1, 4, 3, gated=False, initial_state=True, seed=2)
    kw["beta"] = torch.ones_like(kw["beta"])
    _, S = delta_rule(**kw, return_final_state=True, backend="torch")
    torch.testing.assert_close(torch.einsum("bhkv,bhk->bhv", S, kw["k"][:, -1]), kw["v"][:, -1], **F64)


def test_float32_and_bf16_within_stated_bounds():
    kw64 = make_inputs(2, 70, 2, 8, 8, seed=3)
    ref = delta_rule(**kw64, backend="ref")
    torch.testing.assert_close(delta_rule(**{n: t.float() for n, t in kw64.items()}, backend="torch"), ref.float(),
                               atol=1e-4, rtol=1e-4)
    kw16 = {n: t.bfloat16() for n, t in kw64.items()}
    out = delta_rule(**kw16, backend="torch")
    same_values = delta_rule(**{n: t.double() for n, t in kw16.items()}, backend="ref")
    assert out.dtype == torch.bfloat16
    assert ((out.double() - same_values).norm() / same_values.norm()).item() < 1e-2


def test_strong_decays_stay_finite_at_4096():
    kw = make_inputs(1, 4096, 2, 4, 4, strength=60.0, seed=4, dtype=torch.float32)
    o, s = delta_rule(**kw, return_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_tail, s_tail = delta_rule(**sliced(kw, -50, None), return_final_state=True, backend="ref")
    torch.testing.assert_close(o[:, -40:], o_tail[:, -40:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_tail, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("gated", [False, True])
def test_packed_documents_match_separate_calls(backend, gated):
    kw = make_inputs(1, 23, 2, 3, 4, gated=gated, initial_state=True, seed=5)
    seq_idx = torch.tensor([[0] * 9 + [1] + [2] * 13])
    packed, s_packed = delta_rule(**kw, seq_idx=seq_idx, return_final_state=True, chunk_size=4, backend=backend)
    outs, state = [], None
    for i, (a, b) in enumerate([(0, 9), (9, 10), (10, 23)]):
        part = sliced(kw, a, b)
        if i:
            part.pop("initial_state")
        o, state = delta_rule(**part, return_final_state=True, backend="ref")
        outs.append(o)
    torch.testing.assert_close(packed, torch.cat(outs, dim=1), **F64)
    torch.testing.assert_close(s_packed, state, **F64)


@pytest.mark.parametrize("gated", [False, True])
def test_decode_steps_match_parallel(gated):
    kw = make_inputs(2, 9, 2, 3, 4, gated=gated, initial_state=True, seed=6)
    parallel, s_parallel = delta_rule(**kw, return_final_state=True, chunk_size=4, backend="torch")
    state = kw["initial_state"].clone()
    steps = [
        delta_rule_step(state, kw["q"][:, t], kw["k"][:, t], kw["v"][:, t], kw["beta"][:, t],
                        kw["g"][:, t] if gated else None)
        for t in range(9)
    ]
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel, **F64)
    torch.testing.assert_close(state, s_parallel, **F64)


@pytest.mark.parametrize(
    "argument, change",
    [
        ("q", lambda kw: kw.update(q=kw["q"][0])),
        ("k", lambda kw: kw.update(k=kw["k"][:, :, :, :2])),
        ("v", lambda kw: kw.update(v=kw["v"].float())),
        ("beta", lambda kw: kw.update(beta=kw["beta"][..., None])),
        ("g", lambda kw: kw.update(g=kw["g"][:, :3])),
        ("initial_state", lambda kw: kw.update(initial_state=torch.zeros(2, 3, 5, 5, dtype=torch.float64))),
        ("seq_idx", lambda kw: kw.update(seq_idx=torch.zeros(2, 20))),
        ("chunk_size", lambda kw: kw.update(chunk_size=-1)),
        ("backend", lambda kw: kw.update(backend="fast")),
    ],
)
def test_bad_input_is_an_input_error_naming_the_argument(argument, change):
    kw = make_inputs(initial_state=True)
    change(kw)
    with pytest.raises(InputError, match=f"^{argument}:"):
        delta_rule(**kw)


def test_triton_backend_without_cuda_or_the_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        delta_rule(**make_inputs(), backend="triton")
    with pytest.raises(InputError, match="^state:"):
        delta_rule_step(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.zeros(1, 1, 2),
                        torch.zeros(1, 1))
