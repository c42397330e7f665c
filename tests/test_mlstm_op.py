"""Specification of the mLSTM op (seqlab.ops.mlstm): the chunkwise form equals the stabilised recurrence and the
quadratic form on fresh random inputs, forward and gradients, for gates that would overflow without the stabiliser;
states carry across calls, packed documents stay apart, the chunkwise path never builds an (L, L) tensor, and bad
inputs raise InputError. The mLSTM mixer trains through the chunkwise path with the values of the quadratic one.

Tolerances: float64 1e-9 (the forms differ only in summation order); float32 2e-4 relative to float64 (gate
pre-activations up to ±40, so the stabiliser subtracts numbers of that size); bfloat16 inputs 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.mlstm import mlstm, mlstm_quadratic, mlstm_step

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def cell_inputs(seed, B=2, L=37, H=3, K=5, V=4, dtype=torch.float64, i_scale=15.0, f_scale=3.0, f_shift=0.0,
                state=True, forget_gate="sigmoid"):
    """q, k, v, i_gate, f_gate and an initial state (or None), float64 then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = randn(B, L, H, K), randn(B, L, H, K), randn(B, L, H, V)
    i_gate = i_scale * randn(B, L, H)
    f_gate = f_scale * randn(B, L, H) + f_shift
    if forget_gate == "exp":  # log f = f̃ <= 0 mostly, a few steps that grow the state
        f_gate = -f_gate.abs() + 0.2
    init = (randn(B, H, K, V), randn(B, H, K), randn(B, H)) if state else None
    cast = [t.to(dtype) for t in (q, k, v, i_gate, f_gate)]
    return (*cast, None if init is None else tuple(t.to(dtype) for t in init))


def packed_seq_idx(B, L):
    """Three documents in row 0 (one starts mid-row, one near the end), a last-position document in row 1."""
    rows = [[0] * 6 + [1] * (L - 9) + [2] * 3, [0] * (L - 1) + [1]]
    return torch.tensor(rows[:B])


def assert_state_close(a, b, **tol):
    for name, x, y in zip("Cnm", a, b):
        torch.testing.assert_close(x.to(y.dtype), y, msg=lambda m, name=name: f"state {name}: {m}", **tol)


def same_cell(a, b, **tol):
    """Two stabilised states hold the same cell: C e^{m} and n e^{m} agree (rescaled to b's m)."""
    Ca, na, ma = a
    Cb, nb, mb = b
    r = torch.exp(ma - mb)
    torch.testing.assert_close(Ca * r[..., None, None], Cb, **tol)
    torch.testing.assert_close(na * r[..., None], nb, **tol)


# ----------------------------------------------------------------------------------------- forms agree


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_chunkwise_equals_recurrence_and_quadratic_form(dtype, chunk_size, packed, forget_gate):
    q, k, v, ig, fg, init = cell_inputs(seed=chunk_size, forget_gate=forget_gate)  # float64
    seq_idx = packed_seq_idx(2, 37) if packed else None
    h_ref, s_ref = mlstm(q, k, v, ig, fg, init, True, seq_idx, forget_gate=forget_gate, backend="ref")
    args = ([t.to(dtype) for t in (q, k, v, ig, fg)], tuple(t.to(dtype) for t in init), True, seq_idx)
    h, s = mlstm(*args[0], *args[1:], chunk_size=chunk_size, forget_gate=forget_gate, backend="torch")
    h_quad, s_quad = mlstm_quadratic(*args[0], *args[1:], forget_gate=forget_gate)
    assert h.dtype == dtype and s[0].dtype == dtype
    assert torch.isfinite(h).all() and h.abs().max() > 0.1
    for out, state in ((h, s), (h_quad, s_quad)):
        torch.testing.assert_close(out.double(), h_ref, **TOL[dtype])
        assert_state_close(state, s_ref, **TOL[dtype])  # m is a max, the same number in every form


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), L=st.integers(1, 40), H=st.integers(1, 3), K=st.integers(1, 6), V=st.integers(1, 6),
       chunk_size=st.integers(1, 48), packed=st.booleans(), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_chunkwise_equals_recurrence_on_random_shapes(B, L, H, K, V, chunk_size, packed, with_state, seed):
    q, k, v, ig, fg, init = cell_inputs(seed, B=B, L=L, H=H, K=K, V=V, state=with_state)
    seq_idx = torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(seed)).cumsum(-1) if packed else None
    h_ref, s_ref = mlstm(q, k, v, ig, fg, init, True, seq_idx, backend="ref")
    h, s = mlstm(q, k, v, ig, fg, init, True, seq_idx, chunk_size=chunk_size, backend="torch")
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])
    assert_state_close(s, s_ref, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------ gradients


def _loss_weights(h, state, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (h, *state)]


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_chunkwise_gradients_equal_the_recurrence(packed):
    inputs = cell_inputs(seed=3, L=23, i_scale=8.0)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:5]] + [t.clone().requires_grad_(True) for t in inputs[5]]
    seq_idx = packed_seq_idx(2, 23) if packed else None
    grads = {}
    for backend, chunk_size in (("ref", 64), ("torch", 6), ("torch", 64)):
        h, s = mlstm(*leaves[:5], tuple(leaves[5:]), True, seq_idx, chunk_size=chunk_size, backend=backend)
        loss = sum((w * t).sum() for w, t in zip(_loss_weights(h, s, seed=4), (h, *s)))
        grads[backend, chunk_size] = torch.autograd.grad(loss, leaves)
    names = ["q", "k", "v", "i_gate", "f_gate", "C0", "n0", "m0"]
    for key in (("torch", 6), ("torch", 64)):
        for name, a, b in zip(names, grads[key], grads["ref", 64]):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=f"d{name} {key}")
    assert all(g.abs().max() > 0 for g in grads["ref", 64])


def test_chunkwise_passes_gradcheck_across_chunks_documents_and_padding():
    q, k, v, ig, fg, init = cell_inputs(seed=5, B=1, L=9, H=2, K=2, V=3, i_scale=2.0)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5])
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v, ig, fg, *init))

    def fn(q, k, v, ig, fg, C0, n0, m0):
        h, (C, n, m) = mlstm(q, k, v, ig, fg, (C0, n0, m0), True, seq_idx, chunk_size=4, backend="torch")
        return h, C, n, m

    assert torch.autograd.gradcheck(fn, leaves)


# ------------------------------------------------------------------------------------------- stability


# gate regimes: input-gate scale/shift, forget-gate scale/shift (pre-activations)
EXTREME_GATES = {
    "input+30..+90": dict(f_scale=3.0),  # i_gate replaced below: exp(90) overflows float32 (max e^88.7)
    "forget-strong": dict(i_scale=5.0, f_shift=-30.0),  # f ≈ e^-30
    "forget-weak": dict(i_scale=5.0, f_shift=30.0),  # f ≈ 1
    "input-100": dict(i_scale=1.0, i_shift=-100.0),  # after a document start m = ĩ: e^{-m} overflows float32
}


@pytest.mark.parametrize("gates", list(EXTREME_GATES))
def test_extreme_gates_stay_finite_in_float32(gates):
    regime = dict(dict(i_scale=0.0, f_scale=1.0, f_shift=0.0, i_shift=0.0), **EXTREME_GATES[gates])
    i_shift = regime.pop("i_shift")
    q, k, v, ig, fg, _ = cell_inputs(seed=6, L=50, state=False, **regime)
    ig = ig + i_shift
    if gates == "input+30..+90":
        ig = 30.0 + 60.0 * torch.rand(ig.shape, generator=torch.Generator().manual_seed(7), dtype=ig.dtype)
    seq_idx = packed_seq_idx(2, 50)
    h_ref, s_ref = mlstm(q, k, v, ig, fg, None, True, seq_idx, backend="ref")
    leaves = [t.float().requires_grad_(True) for t in (q, k, v, ig, fg)]
    h, s = mlstm(*leaves, None, True, seq_idx, chunk_size=16, backend="torch")
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in s)
    torch.testing.assert_close(h.double(), h_ref, **TOL[torch.float32])
    torch.testing.assert_close(s[2].double(), s_ref[2], **TOL[torch.float32])
    h.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_bfloat16_inputs_follow_the_float64_recurrence():
    q, k, v, ig, fg, init = cell_inputs(seed=8, L=40)
    bf = [t.to(torch.bfloat16) for t in (q, k, v, ig, fg)]
    h_ref = mlstm(*[t.double() for t in bf], init, backend="ref")
    h = mlstm(*bf, tuple(t.float() for t in init), chunk_size=16, backend="torch")
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.double(), h_ref, **TOL[torch.bfloat16])


# ------------------------------------------------------------------------------ states, documents, decode


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_two_calls_carrying_the_state_equal_one_call(backend):
    q, k, v, ig, fg, init = cell_inputs(seed=9, L=45)
    h_all, s_all = mlstm(q, k, v, ig, fg, init, True, chunk_size=8, backend=backend)
    cut = 19  # not a chunk boundary
    h1, s1 = mlstm(q[:, :cut], k[:, :cut], v[:, :cut], ig[:, :cut], fg[:, :cut], init, True, chunk_size=8,
                   backend=backend)
    h2, s2 = mlstm(q[:, cut:], k[:, cut:], v[:, cut:], ig[:, cut:], fg[:, cut:], s1, True, chunk_size=8,
                   backend=backend)
    torch.testing.assert_close(torch.cat([h1, h2], dim=1), h_all, **TOL[torch.float64])
    assert_state_close(s2, s_all, **TOL[torch.float64])


def test_packed_documents_equal_separate_sequences():
    q, k, v, ig, fg, init = cell_inputs(seed=10, B=1, L=30)
    bounds = [(0, 7), (7, 8), (8, 30)]  # a one-token document in the middle
    seq_idx = torch.cat([torch.full((1, b - a), i) for i, (a, b) in enumerate(bounds)], dim=1)
    h_packed, s_packed = mlstm(q, k, v, ig, fg, init, True, seq_idx, chunk_size=8, backend="torch")
    parts, state = [], None
    for i, (a, b) in enumerate(bounds):  # the initial state belongs to the first document only
        h, state = mlstm(q[:, a:b], k[:, a:b], v[:, a:b], ig[:, a:b], fg[:, a:b], init if i == 0 else None, True,
                         chunk_size=8, backend="torch")
        parts.append(h)
    torch.testing.assert_close(h_packed, torch.cat(parts, dim=1), **TOL[torch.float64])
    same_cell(s_packed, state, **TOL[torch.float64])
    h_joined = mlstm(q, k, v, ig, fg, init, chunk_size=8, backend="torch")
    assert (h_joined[:, 7:] - h_packed[:, 7:]).abs().max() > 1e-3  # the reset matters, so this test can fail


def test_decode_steps_equal_the_chunkwise_forward():
    q, k, v, ig, fg, init = cell_inputs(seed=11, L=12, dtype=torch.float32)
    h_all, s_all = mlstm(q, k, v, ig, fg, init, True, chunk_size=5)
    state = tuple(t.clone() for t in init)
    steps = [mlstm_step(state, q[:, t], k[:, t], v[:, t], ig[:, t], fg[:, t]) for t in range(12)]
    torch.testing.assert_close(torch.stack(steps, dim=1), h_all, **TOL[torch.float32])
    assert_state_close(state, s_all, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------- memory


class _LargestTensor:
    """Records the largest tensor (numel) any aten op produces while active, forward and backward."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        probe = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        probe.largest = max(probe.largest, t.numel())
                return out

        self.largest, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _train_step(form, L, **kwargs):
    q, k, v, ig, fg, _ = cell_inputs(seed=12, B=1, L=L, H=1, K=4, V=4, dtype=torch.float32, state=False)
    leaves = [t.requires_grad_(True) for t in (q, k, v, ig, fg)]
    with _LargestTensor() as probe:
        form(*leaves, **kwargs).sum().backward()
    return probe.largest


def test_chunkwise_training_never_materialises_an_L_by_L_tensor():
    L, T = 4096, 64
    largest = _train_step(mlstm, L, chunk_size=T, backend="torch")
    assert largest <= 2 * L * T, f"largest tensor {largest} elements, expected O(L·T) = {L * T}"
    # the probe sees the (L, L) matrix of the quadratic form (at a smaller L), so it can fail
    assert _train_step(mlstm_quadratic, 256) >= 256 * 256


# ---------------------------------------------------------------------------------------------- inputs


def _bad_calls():
    q, k, v, ig, fg, init = cell_inputs(seed=13, B=2, L=6, H=2, K=3, V=4, dtype=torch.float32)
    ok = dict(q=q, k=k, v=v, i_gate=ig, f_gate=fg)

    def call(**change):
        return lambda: mlstm(**{**ok, **change})

    return {
        "q-3d": ("q", call(q=q[0])),
        "k-headdim": ("k", call(k=k[..., :2])),
        "v-length": ("v", call(v=v[:, :5])),
        "v-dtype": ("v", call(v=v.double())),
        "i_gate-shape": ("i_gate", call(i_gate=ig[..., None])),
        "f_gate-int": ("f_gate", call(f_gate=fg.long())),
        "empty": ("q", call(q=q[:, :0], k=k[:, :0], v=v[:, :0], i_gate=ig[:, :0], f_gate=fg[:, :0])),
        "state-not-tuple": ("initial_state", call(initial_state=init[0])),
        "state-C-shape": ("initial_state[0] (C)", call(initial_state=(init[0][..., :3], init[1], init[2]))),
        "state-m-shape": ("initial_state[2] (m)", call(initial_state=(init[0], init[1], init[2][:1]))),
        "seq_idx-float": ("seq_idx", call(seq_idx=torch.zeros(2, 6))),
        "seq_idx-shape": ("seq_idx", call(seq_idx=torch.zeros(2, 5, dtype=torch.long))),
        "chunk_size-0": ("chunk_size", call(chunk_size=0)),
        "chunk_size-float": ("chunk_size", call(chunk_size=8.0)),
        "forget_gate": ("forget_gate", call(forget_gate="tanh")),
        "scale": ("scale", call(scale="1")),
        "backend": ("backend", call(backend="cuda")),
        "step-state": ("state[1] (n)", lambda: mlstm_step((init[0], init[1][:, :1], init[2]), q[:, 0], k[:, 0],
                                                           v[:, 0], ig[:, 0], fg[:, 0])),
        "step-q": ("q", lambda: mlstm_step(init, q, k, v, ig, fg)),
        "quadratic-k": ("k", lambda: mlstm_quadratic(q, k[:, :, :1], v, ig, fg)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_input_error_naming_the_argument(case):
    argument, call = _bad_calls()[case]
    with pytest.raises(InputError) as err:
        call()
    assert err.value.argument == argument


def test_triton_backend_is_unavailable():
    q, k, v, ig, fg, init = cell_inputs(seed=14, L=4, dtype=torch.float32)
    with pytest.raises(BackendUnavailable, match="backend='torch'"):
        mlstm(q, k, v, ig, fg, backend="triton")
    with pytest.raises(BackendUnavailable):
        mlstm_step(init, q[:, 0], k[:, 0], v[:, 0], ig[:, 0], fg[:, 0], backend="triton")


# ----------------------------------------------------------------------------------------------- mixer


def _mixer(chunk_size, seed=0):
    from seqlab.mixers.mlstm import MLSTM

    torch.manual_seed(seed)
    m = MLSTM(32, n_heads=2, chunk_size=chunk_size)
    with torch.no_grad():  # move the gates off their zero init so every parameter matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_mixer_chunkwise_training_equals_the_quadratic_form(monkeypatch):
    import seqlab.mixers.mlstm as mixer_module

    x = torch.randn(2, 23, 32, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])
    outputs = {}
    for name in ("chunkwise", "quadratic"):
        if name == "quadratic":  # the pre-chunkwise mixer: the whole-sequence parallel form
            monkeypatch.setattr(mixer_module, "mlstm", lambda *a, chunk_size, **kw: mlstm_quadratic(*a, **kw))
        m = _mixer(chunk_size=5).double()  # float64: the gates reach ±40, float32 would blur the comparison
        y = m(x, seq_idx=seq_idx)
        y.square().sum().backward()
        outputs[name] = (y, {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(outputs["chunkwise"][0], outputs["quadratic"][0], **TOL[torch.float64])
    for n, g in outputs["chunkwise"][1].items():
        torch.testing.assert_close(g, outputs["quadratic"][1][n], rtol=1e-8, atol=1e-8, msg=n)


def test_mixer_checkpoint_names_and_state_layout_are_unchanged():
    m = _mixer(chunk_size=8)
    assert sorted(n for n, _ in m.named_parameters()) == sorted([
        "up_proj.weight", "conv1d.weight", "conv1d.bias", "q_proj.weight", "k_proj.weight", "v_proj.weight",
        "igate.weight", "igate.bias", "fgate.weight", "fgate.bias", "norm_weight", "skip", "out_proj.weight"])
    state = m.allocate_state(3, 10)
    H, P = m.nheads, m.headdim
    assert {n: tuple(t.shape) for n, t in state.tensors.items()} == {
        "conv": (3, m.d_inner, m.d_conv - 1), "C": (3, H, P, P), "n": (3, H, P), "m": (3, H)}


def test_mixer_chunked_prefill_then_decode_equals_one_forward():
    m = _mixer(chunk_size=4, seed=1).eval()
    x = torch.randn(2, 21, 32, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        whole = m(x)
        state = m.allocate_state(2, 21)
        parts = [m(x[:, a:b], state=state) for a, b in [(0, 6), (6, 15), (15, 16), (16, 17), (17, 21)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, **TOL[torch.float32])
