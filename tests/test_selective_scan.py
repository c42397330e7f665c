"""Mamba-1 selective scan: the fast paths equal the readable per-timestep reference.

Tolerances (relative error ||out - ref|| / ||ref||): float64 1e-10; float32 1e-5; bf16 inputs 1e-2 (the output is
rounded to bf16, 2^-8 relative, and the scan itself runs in float32 on both sides).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.selective_scan import (
    _scan_chunked,
    _scan_sequential,
    _selective_scan_fast,
    _selective_scan_ref,
    selective_scan,
    selective_state_update,
)

# the module (seqlab.ops.selective_scan the attribute is the function, by the package's lazy exports)
ss_module = importlib.import_module("seqlab.ops.selective_scan")
FAST_PATHS = {"chunked": True, "loop": False}
DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(batch, seqlen, dim, d_state, groups=1, *, grouped=True, skip=True, gate=True, bias=True,
                init=True, docs=0, dtype=torch.float64, seed=0, requires_grad=True):
    """Fresh random inputs of selective_scan as a dict of keyword arguments (A < 0 as in Mamba)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    bc_shape = (batch, seqlen, groups, d_state) if grouped else (batch, seqlen, d_state)
    kw = {
        "u": r(batch, seqlen, dim),
        "delta": r(batch, seqlen, dim),
        "A": -torch.rand(dim, d_state, generator=g, dtype=dtype) * 2 - 0.1,
        "B": r(*bc_shape),
        "C": r(*bc_shape),
        "D": r(dim) if skip else None,
        "z": r(batch, seqlen, dim) if gate else None,
        "delta_bias": r(dim) if bias else None,
        "initial_state": r(batch, dim, d_state) if init else None,
    }
    if requires_grad:
        for v in kw.values():
            if v is not None:
                v.requires_grad_()
    if docs:
        # random document boundaries per row: seq_idx is non-decreasing with `docs` extra starts
        cuts = torch.randint(0, max(seqlen, 1), (batch, docs), generator=g)
        kw["seq_idx"] = (torch.arange(seqlen)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32)
    return kw


def scan_args(kw):
    """Positional arguments of the private paths, in order, from make_inputs' dict."""
    return (kw["u"], kw["delta"], kw["A"], _grouped(kw["B"]), _grouped(kw["C"]), kw["D"], kw["z"], kw["delta_bias"],
            kw.get("delta_softplus", True), kw["initial_state"], kw.get("seq_idx"))


def _grouped(t):
    return t if t.dim() == 4 else t.unsqueeze(2)


def grads(y, h, kw, seed=1):
    """Gradients of a random linear function of (y, final state) w.r.t. every differentiable input present."""
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    names = [n for n in DIFFERENTIABLE if kw.get(n) is not None]
    out = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), [kw[n] for n in names])
    return dict(zip(names, out))


shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 2),
    "seqlen": st.integers(1, 40),
    "groups": st.integers(1, 3),
    "per_group": st.integers(1, 3),
    "d_state": st.integers(1, 4),
    "grouped": st.booleans(),
    "skip": st.booleans(),
    "gate": st.booleans(),
    "bias": st.booleans(),
    "init": st.booleans(),
    "docs": st.integers(0, 3),
    "softplus": st.booleans(),
    "chunk": st.sampled_from([1, 3, 8, 64]),
    "group_len": st.sampled_from([None, 5, 16]),
    "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("path", FAST_PATHS)
@settings(max_examples=60, deadline=None)
@given(s=shapes)
def test_fast_path_matches_ref_forward_and_gradients(path, s):
    groups = s["groups"] if s["grouped"] else 1
    kw = make_inputs(s["batch"], s["seqlen"], groups * s["per_group"], s["d_state"], groups, grouped=s["grouped"],
                     skip=s["skip"], gate=s["gate"], bias=s["bias"], init=s["init"], docs=s["docs"], seed=s["seed"])
    kw["delta_softplus"] = s["softplus"]
    if not s["softplus"]:  # raw delta must be a positive step size
        kw["delta"] = kw["delta"].detach().abs().requires_grad_()
    y_ref, h_ref = _selective_scan_ref(*scan_args(kw))
    y, h = _selective_scan_fast(*scan_args(kw), chunked=FAST_PATHS[path], chunk_size=s["chunk"],
                                group_len=s["group_len"])
    assert relerr(y, y_ref) < 1e-10
    assert relerr(h, h_ref) < 1e-10
    g_ref, g = grads(y_ref, h_ref, kw), grads(y, h, kw)
    for name in g_ref:
        assert relerr(g[name], g_ref[name]) < 1e-10, name


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("length", [1, 7, 32, 45])
def test_chunked_linear_scan_matches_sequential(length, reverse):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 3, 2, generator=g, dtype=torch.float64)
    a[a < 0.1] = 0.0  # document starts cut the recurrence
    x = torch.randn(2, length, 3, 2, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    want = _scan_sequential(a, x.clone(), h0, reverse)
    got = _scan_chunked(a, x.clone(), h0, 8, reverse)
    assert relerr(got, want) < 1e-12


@pytest.mark.parametrize("path", FAST_PATHS)
def test_gradcheck_float64(path):
    kw = make_inputs(2, 11, 4, 3, 2, docs=1, seed=3)
    names = [n for n in DIFFERENTIABLE]

    def f(*tensors):
        kw2 = dict(kw, **dict(zip(names, tensors)))
        return _selective_scan_fast(*scan_args(kw2), chunked=FAST_PATHS[path], chunk_size=4, group_len=8)

    assert torch.autograd.gradcheck(f, [kw[n] for n in names])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_public_backends_match_ref_float32(backend):
    # L=150 spans two default chunks (64) plus a ragged tail
    kw = make_inputs(2, 150, 8, 4, 2, docs=2, dtype=torch.float32, seed=5)
    y_ref, h_ref = selective_scan(**kw, return_final_state=True, backend="ref")
    y, h = selective_scan(**kw, return_final_state=True, backend=backend)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert relerr(y, y_ref) < 1e-5 and relerr(h, h_ref) < 1e-5
    g_ref, g = grads(y_ref, h_ref, kw), grads(y, h, kw)
    for name in g_ref:
        assert relerr(g[name], g_ref[name]) < 1e-5, name


def test_auto_on_cpu_matches_ref_at_both_sides_of_the_size_rule():
    for dim in (8, 2 * ss_module.CPU_CHUNKED_MAX_STATE):  # N=1: B*D*N below, then above the threshold
        kw = make_inputs(1, 70, dim, 1, dtype=torch.float32, requires_grad=False)
        assert relerr(selective_scan(**kw), selective_scan(**kw, backend="ref")) < 1e-5


@pytest.mark.parametrize("path", FAST_PATHS)
def test_bf16_inputs_within_bound(path):
    kw = make_inputs(2, 100, 16, 8, 2, dtype=torch.float32, seed=7, requires_grad=False)
    for name in ("u", "delta", "B", "C", "z"):
        kw[name] = kw[name].bfloat16()
    y_ref, h_ref = _selective_scan_ref(*scan_args(kw))  # float32 compute on the same bf16 values
    y, h = _selective_scan_fast(*scan_args(kw), chunked=FAST_PATHS[path])
    out = selective_scan(**kw, backend="torch" if FAST_PATHS[path] else "auto")
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert relerr(out, y_ref) < 1e-2
    assert relerr(y, y_ref) < 1e-5 and relerr(h, h_ref) < 1e-5


@pytest.mark.parametrize("path", FAST_PATHS)
def test_scan_accumulates_in_float32_under_bf16_autocast(path):
    kw = make_inputs(2, 70, 16, 8, 2, dtype=torch.float32, seed=31, requires_grad=False)
    y_ref, h_ref = _selective_scan_ref(*scan_args(kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = _selective_scan_fast(*scan_args(kw), chunked=FAST_PATHS[path])
    assert relerr(y, y_ref) < 1e-5 and relerr(h, h_ref) < 1e-5


@pytest.mark.parametrize("backend", ["ref", "torch", "auto"])
def test_packed_documents_match_separate_runs(backend):
    lengths = [[5, 1, 30, 12], [48]]  # two rows of the same length, packed from 4 and 1 documents
    dim, d_state = 6, 3
    packed = make_inputs(2, 48, dim, d_state, 2, seed=29, requires_grad=False)
    packed["seq_idx"] = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]) for lens in lengths])
    y, h = selective_scan(**packed, return_final_state=True, backend=backend)
    for row, lens in enumerate(lengths):
        start, state = 0, packed["initial_state"][row:row + 1]  # initial_state feeds the first document only
        for i, n in enumerate(lens):
            doc = {k: v[row:row + 1, start:start + n] for k, v in packed.items() if k in ("u", "delta", "B", "C", "z")}
            y_doc, state = selective_scan(**doc, A=packed["A"], D=packed["D"], delta_bias=packed["delta_bias"],
                                          initial_state=state if i == 0 else None, return_final_state=True,
                                          backend="ref")
            assert relerr(y[row:row + 1, start:start + n], y_doc) < 1e-10, (row, i)
            start += n
        assert relerr(h[row:row + 1], state) < 1e-10  # final state = state after the row's last document


@pytest.mark.parametrize("grouped", [False, True])
def test_state_update_steps_match_scan(grouped):
    kw = make_inputs(2, 9, 6, 4, 3, grouped=grouped, dtype=torch.float32, seed=13, requires_grad=False)
    y_scan, h_scan = selective_scan(**kw, return_final_state=True, backend="auto")
    state = kw["initial_state"].clone()
    state_ptr = state.data_ptr()
    for t in range(9):
        y_t = selective_state_update(state, kw["u"][:, t], kw["delta"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t],
                                     D=kw["D"], z=kw["z"][:, t], dt_bias=kw["delta_bias"])
        torch.testing.assert_close(y_t, y_scan[:, t], rtol=1e-6, atol=1e-6)
    assert state.data_ptr() == state_ptr  # updated in place
    torch.testing.assert_close(state, h_scan, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_extreme_delta_stays_finite_and_matches_ref(path):
    kw = make_inputs(1, 200, 8, 4, bias=False, dtype=torch.float32, seed=17)
    extreme = torch.where(torch.rand(1, 200, 8) < 0.5, 1e3, 1e-6)  # step sizes after softplus
    kw["delta"] = extreme.requires_grad_()
    kw["delta_softplus"] = False
    y_ref, h_ref = _selective_scan_ref(*scan_args(kw))
    y, h = _selective_scan_fast(*scan_args(kw), chunked=FAST_PATHS[path], chunk_size=16)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert relerr(y, y_ref) < 1e-5 and relerr(h, h_ref) < 1e-5
    g_ref, g = grads(y_ref, h_ref, kw), grads(y, h, kw)
    for name in g_ref:
        assert torch.isfinite(g[name]).all(), name
        assert relerr(g[name], g_ref[name]) < 1e-4, name


def test_long_sequence_16384_matches_ref():
    kw = make_inputs(1, 16384, 4, 4, docs=3, dtype=torch.float32, seed=19, requires_grad=False)
    y_ref, h_ref = selective_scan(**kw, return_final_state=True, backend="ref")
    for chunked in FAST_PATHS.values():
        y, h = _selective_scan_fast(*scan_args(kw), chunked=chunked)
        assert torch.isfinite(y).all()
        assert relerr(y, y_ref) < 1e-5 and relerr(h, h_ref) < 1e-5


def test_long_sequence_gradients_finite():
    kw = make_inputs(1, 16384, 4, 4, dtype=torch.float32, seed=23)
    y, h = selective_scan(**kw, return_final_state=True, backend="torch")
    for name, g in grads(y, h, kw).items():
        assert torch.isfinite(g).all(), name


def _bad_inputs():
    kw = make_inputs(2, 5, 6, 4, 2, docs=1, dtype=torch.float32, requires_grad=False)
    cases = {
        "u": {"u": kw["u"][0]},  # wrong rank
        "delta": {"delta": kw["delta"][:, :4]},
        "A": {"A": kw["A"][:5]},
        "B": {"B": kw["B"][..., :3]},  # N mismatch with A
        "C": {"C": kw["C"][:, :, :1]},  # G mismatch with B
        "D": {"D": kw["D"][:4]},
        "z": {"z": kw["z"][:1]},
        "delta_bias": {"delta_bias": kw["delta_bias"].int()},  # non-float
        "initial_state": {"initial_state": kw["initial_state"][:, :, :2]},
        "seq_idx": {"seq_idx": kw["seq_idx"].float()},
        "backend": {"backend": "cuda"},
    }
    return kw, cases


@pytest.mark.parametrize("argument", list(_bad_inputs()[1]))
def test_bad_input_raises_input_error_naming_argument(argument):
    kw, cases = _bad_inputs()
    with pytest.raises(InputError, match=f"^{argument}:") as info:
        selective_scan(**{**kw, **cases[argument]})
    assert info.value.argument == argument


def test_groups_must_divide_channels():
    kw = make_inputs(1, 4, 6, 2, 4, requires_grad=False)  # D=6, G=4
    with pytest.raises(InputError, match="^B:"):
        selective_scan(**kw)


def test_integer_u_and_wrong_seq_idx_shape_rejected():
    kw = make_inputs(1, 4, 2, 2, requires_grad=False, docs=1)
    with pytest.raises(InputError, match="^u:"):
        selective_scan(**{**kw, "u": kw["u"].long()})
    with pytest.raises(InputError, match="^seq_idx:"):
        selective_scan(**{**kw, "seq_idx": kw["seq_idx"][:, :3]})


@pytest.mark.parametrize("argument", ["delta", "B", "z", "initial_state"])
def test_tensors_on_different_devices_rejected(argument):
    kw = make_inputs(1, 4, 2, 2, requires_grad=False)
    kw[argument] = kw[argument].to("meta")
    with pytest.raises(InputError, match=f"^{argument}:"):
        selective_scan(**kw)


def test_state_update_bad_state_shape():
    kw = make_inputs(2, 1, 4, 3, requires_grad=False)
    with pytest.raises(InputError, match="^state:"):
        selective_state_update(torch.zeros(2, 4, 2), kw["u"][:, 0], kw["delta"][:, 0], kw["A"], kw["B"][:, 0, 0],
                               kw["C"][:, 0, 0])


def test_triton_backend_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kw = make_inputs(1, 4, 2, 2, requires_grad=False)
    with pytest.raises(BackendUnavailable):
        selective_scan(**kw, backend="triton")
    state = torch.zeros(1, 2, 2)
    with pytest.raises(BackendUnavailable):
        selective_state_update(state, kw["u"][:, 0], kw["delta"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0],
                               backend="triton")


def test_auto_on_cpu_never_runs_triton_even_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("auto must not pick the triton path on the CPU")

    monkeypatch.setattr(ss_module, "require_triton", refuse)
    kw = make_inputs(1, 6, 2, 2, requires_grad=False)
    assert relerr(selective_scan(**kw), selective_scan(**kw, backend="ref")) < 1e-10
