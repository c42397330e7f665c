"""The Triton delta-rule kernels equal the per-timestep recurrence (float64 ``ref``), forward, final state and every
gradient, with and without the gate, with an initial state and packed documents, across checkpoint chunks and
V-tiles; the Triton decode steps of the delta rule and of linear attention equal their torch steps.

On the CPU these run under TRITON_INTERPRET=1 (``make test`` sets it) on small shapes; on a CUDA machine natively.
Tolerance: relative error ||out - ref|| / ||ref|| <= 1e-4 for float32 inputs (float32 accumulation); bf16 inputs
within 1e-2 of the float64 reference on the same (rounded) values; decode steps 1e-5. NaN never passes.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from triton_compile import assert_compiles_for_sm90
from triton_family_checks import (
    DEVICE,
    check_against_ref,
    float64_randn,
    needs_triton,
    on_device,
    random_documents,
    rel_err,
    sm90_payload,
)

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.delta_rule import delta_rule, delta_rule_step
from seqlab.ops.linear_attention import linear_attention_step

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.triton]


def make_inputs(batch, seqlen, nheads, dk, dv, *, gated=True, initial_state=False, docs=False, strength=1.0,
                seed=0):
    """float64 inputs on DEVICE: L2-normalised keys, β in (0, 1), log-decays uniform in [-strength, 0]."""
    gen = torch.Generator().manual_seed(seed)
    randn = float64_randn(gen)
    kw = dict(q=randn(batch, seqlen, nheads, dk), k=F.normalize(randn(batch, seqlen, nheads, dk), dim=-1),
              v=randn(batch, seqlen, nheads, dv),
              beta=torch.rand(batch, seqlen, nheads, generator=gen, dtype=torch.float64))
    if gated:
        kw["g"] = -strength * torch.rand(batch, seqlen, nheads, generator=gen, dtype=torch.float64)
    if initial_state:
        kw["initial_state"] = randn(batch, nheads, dk, dv)
    if docs:
        kw["seq_idx"] = random_documents(batch, seqlen, gen)
    return on_device(kw)


def _check(kw, dtype=torch.float32, tol=1e-4, **options):
    check_against_ref(delta_rule, kw, dtype, tol, **options)


CASES = [  # (batch, seqlen, nheads, dk, dv, chunk_size, gated, initial_state, docs)
    (1, 16, 1, 16, 16, 64, False, False, False),  # one chunk, no options
    (2, 23, 2, 5, 3, 8, True, True, False),  # ragged last chunk; K and V not powers of two
    (2, 30, 2, 8, 20, 7, True, False, True),  # two V-tiles (partial sums over V); documents across chunks
    (1, 25, 3, 4, 6, 4, False, True, True),  # ungated delta rule with documents and an initial state
    (2, 1, 2, 3, 2, 64, True, True, False),  # a single position
    (1, 19, 1, 33, 17, 5, True, True, True),  # K padded to 64, two V-tiles, everything on
    (1, 70, 2, 6, 5, 32, True, True, True),  # three chunks of the chunked forward, the last one ragged
    (1, 20, 1, 4, 70, 8, True, True, False),  # V = 70: several V-tiles in every kernel
]


@pytest.fixture(params=["chunked forward", "recurrent forward"])
def forward(request, monkeypatch):
    """Both Triton forwards (the backward is the same); the chunked one is the default."""
    from seqlab.ops.triton import delta_rule as dr

    monkeypatch.setattr(dr, "CHUNKED_FORWARD", request.param == "chunked forward")
    return request.param


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_delta_rule_triton_matches_ref_forward_final_state_and_gradients(case, forward):
    batch, seqlen, nheads, dk, dv, chunk_size, gated, init, docs = case
    kw = make_inputs(batch, seqlen, nheads, dk, dv, gated=gated, initial_state=init, docs=docs, seed=seqlen)
    _check(kw, chunk_size=chunk_size)


@needs_triton
def test_delta_rule_triton_documents_starting_on_chunk_boundaries(forward):
    kw = make_inputs(1, 40, 2, 4, 4, initial_state=True, seed=8)
    kw["seq_idx"] = torch.tensor([[0] * 16 + [1] * 16 + [2] * 3 + [3] * 5], dtype=torch.int32, device=DEVICE)
    _check(kw, chunk_size=16)


@needs_triton
def test_delta_rule_triton_strong_decays_and_full_writes_stay_finite_and_exact(forward):
    kw = make_inputs(2, 24, 2, 8, 8, initial_state=True, strength=40.0, seed=3)
    kw["beta"] = torch.where(kw["beta"] > 0.5, torch.ones_like(kw["beta"]), kw["beta"])  # β = 1: overwrite
    _check(kw, chunk_size=8)


@needs_triton
def test_delta_rule_triton_bf16_inputs_within_1e_2():
    kw = make_inputs(1, 24, 2, 16, 16, initial_state=True, seed=4)
    _check(kw, dtype=torch.bfloat16, tol=1e-2, chunk_size=8)


@needs_triton
@pytest.mark.parametrize("uses", ["output only", "final state only"])
def test_delta_rule_triton_gradients_when_the_loss_uses_one_output(uses):
    kw = make_inputs(1, 14, 2, 4, 5, seed=6)  # no initial state: the kernel's state gradient is not asked for
    grads = {}
    for backend, dtype in (("ref", torch.float64), ("triton", torch.float32)):
        leaves = {n: t.detach().to(dtype).requires_grad_(True) for n, t in kw.items()}
        o, S = delta_rule(**leaves, chunk_size=4, backend=backend, return_final_state=True)
        (o.sin().sum() if uses == "output only" else S.sin().sum()).backward()
        grads[backend] = {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}
    if uses == "final state only":  # q does not reach the state
        assert grads["triton"]["q"].abs().max() == 0 and grads["ref"]["q"].abs().max() == 0
        del grads["triton"]["q"], grads["ref"]["q"]
    errors = {n: rel_err(grads["triton"][n], grads["ref"][n]) for n in grads["ref"]}
    assert all(e <= 1e-4 for e in errors.values()), errors


@needs_triton
def test_delta_rule_triton_without_grad_matches_ref(forward):
    kw = {n: t.float() if t.is_floating_point() else t for n, t in make_inputs(2, 12, 2, 4, 4, seed=5).items()}
    with torch.no_grad():
        o, S = delta_rule(**kw, scale=0.7, backend="triton", return_final_state=True)
    o_ref, S_ref = delta_rule(**{n: t.double() if t.is_floating_point() else t for n, t in kw.items()}, scale=0.7,
                              backend="ref", return_final_state=True)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- decode steps


def _step_inputs(batch, nheads, dk, dv, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(batch, nheads, dk, generator=gen), torch.randn(batch, nheads, dk, generator=gen)
    if positive:
        q, k = q.exp(), k.exp()
    return q.to(DEVICE), k.to(DEVICE), torch.randn(batch, nheads, dv, generator=gen).to(DEVICE), gen


@needs_triton
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_step_triton_matches_torch_step_over_several_steps(gated):
    batch, nheads, dk, dv = 2, 3, 5, 20  # dv spans two V-tiles
    gen = torch.Generator().manual_seed(7)
    state = torch.randn(batch, nheads, dk, dv, generator=gen).to(DEVICE)
    state_ref = state.clone()
    for step in range(3):
        q, k, v, _ = _step_inputs(batch, nheads, dk, dv, seed=step)
        k = F.normalize(k, dim=-1)
        beta = torch.rand(batch, nheads, generator=gen).to(DEVICE)
        g = -torch.rand(batch, nheads, generator=gen).to(DEVICE) if gated else None
        o = delta_rule_step(state, q, k, v, beta, g, backend="triton")
        o_ref = delta_rule_step(state_ref, q, k, v, beta, g, backend="torch")
        assert rel_err(o, o_ref) <= 1e-5 and rel_err(state, state_ref) <= 1e-5, step


@needs_triton
@pytest.mark.parametrize("decay, bonus, normalize", [
    ("none", False, False), ("head", False, False), ("channel", False, False), ("channel", True, False),
    ("head", False, True), ("none", True, True),
])
def test_linear_attention_step_triton_matches_torch_step(decay, bonus, normalize):
    batch, nheads, dk, dv = 2, 2, 6, 40  # with the normaliser the state is 41 wide: two V-tiles
    gen = torch.Generator().manual_seed(11)
    state = torch.rand(batch, nheads, dk, dv + int(normalize), generator=gen).to(DEVICE)
    state_ref = state.clone()
    u = torch.randn(nheads, dk, generator=gen).to(DEVICE) if bonus else None
    for step in range(2):
        q, k, v, _ = _step_inputs(batch, nheads, dk, dv, seed=20 + step, positive=normalize)
        shape = {"none": None, "head": (batch, nheads), "channel": (batch, nheads, dk)}[decay]
        g = None if shape is None else -torch.rand(*shape, generator=gen).to(DEVICE)
        o = linear_attention_step(state, q, k, v, g, u, normalize=normalize, backend="triton")
        o_ref = linear_attention_step(state_ref, q, k, v, g, u, normalize=normalize, backend="torch")
        assert rel_err(o, o_ref) <= 1e-5 and rel_err(state, state_ref) <= 1e-5, step


@needs_triton
def test_decode_steps_refuse_a_non_contiguous_state():
    state = torch.zeros(1, 4, 2, 4, device=DEVICE).transpose(1, 2)  # (1, 2, 4, 4), not contiguous
    q = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(InputError, match="^state: expected a contiguous tensor"):
        delta_rule_step(state, q, q, q, torch.zeros(1, 2, device=DEVICE), backend="triton")
    with pytest.raises(InputError, match="^state: expected a contiguous tensor"):
        linear_attention_step(state, q, q, q, backend="triton")


# ------------------------------------------------------------------------------------------ errors and limits


def test_triton_backend_on_cpu_without_the_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = {n: t.cpu() for n, t in make_inputs(1, 4, 1, 2, 2).items()}
    with pytest.raises(BackendUnavailable, match="CUDA"):
        delta_rule(**kw, backend="triton")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        delta_rule_step(torch.zeros(1, 1, 2, 2), kw["q"][:, 0], kw["k"][:, 0], kw["v"][:, 0], kw["beta"][:, 0],
                        backend="triton")


def test_key_dims_too_large_for_the_kernels_raise_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = {n: t.cpu() for n, t in make_inputs(1, 2, 1, 300, 2).items()}
    with pytest.raises(InputError, match=r"^k: expected key dim K <= 256 .* got key dim K = 300"):
        delta_rule(**kw, backend="triton")
    with pytest.raises(InputError, match=r"^k: expected key dim K <= 256"):
        delta_rule_step(torch.zeros(1, 1, 300, 2), kw["q"][:, 0], kw["k"][:, 0], kw["v"][:, 0], kw["beta"][:, 0],
                        backend="triton")


def test_gpu_check_script_refuses_cleanly_without_cuda(monkeypatch, capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "families_gpu.py"
    spec = importlib.util.spec_from_file_location("families_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main(["--out", "unused.json"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- GPU front end on CPU


def _specialisations():
    """(module, kernel, {param: type or None for constexpr}, constexpr values) of every launchable combination."""
    from seqlab.ops.triton import decode_families as dec
    from seqlab.ops.triton import delta_rule as dr

    f32, i32 = "*fp32", "i32"
    specs = []
    for has_g in (False, True):
        for has_reset in (False, True):
            optional = {"g_ptr": f32 if has_g else None, "reset_ptr": "*i32" if has_reset else None}
            for BK, BV in ((16, 16), (64, 16), (256, 16)):
                consts = dict(HAS_G=has_g, HAS_RESET=has_reset, BK=BK, BV=BV)
                fwd = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "beta_ptr", "init_ptr", "o_ptr", "states_ptr",
                                          "final_ptr"), f32), **optional)
                fwd.update(dict.fromkeys(("L", "H", "K", "V", "nchunks", "chunk"), i32))
                fwd.update(dict.fromkeys([*consts, "HAS_INIT", "STORE_STATES"]))
                for flag in (False, True):
                    specs.append((dr, "_delta_fwd_kernel", fwd, dict(consts, HAS_INIT=flag, STORE_STATES=flag)))
                bwd = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "beta_ptr", "states_ptr", "scratch_ptr", "do_ptr",
                                          "dfinal_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dbeta_ptr", "dinit_ptr"), f32),
                           **optional, dg_ptr=f32 if has_g else None)
                bwd.update(dict.fromkeys(("B", "L", "H", "K", "V", "nchunks", "chunk"), i32))
                bwd.update(dict.fromkeys([*consts, "HAS_DFINAL"]))
                for flag in (False, True):
                    specs.append((dr, "_delta_bwd_kernel", bwd, dict(consts, HAS_DFINAL=flag)))
            for T, BK, BV in ((16, 16, 16), (64, 64, 32), (64, 64, 64)):
                consts = dict(HAS_G=has_g, HAS_RESET=has_reset, T=T, BK=BK, BV=BV)
                wy = dict(dict.fromkeys(("k_ptr", "v_ptr", "beta_ptr", "wk_ptr", "wv_ptr"), f32), **optional,
                          **dict.fromkeys(("L", "H", "K", "V"), i32), **dict.fromkeys(consts))
                specs.append((dr, "_delta_wy_kernel", wy, consts))
                walk = dict(dict.fromkeys(("q_ptr", "k_ptr", "wk_ptr", "wv_ptr", "init_ptr", "o_ptr", "states_ptr",
                                           "final_ptr"), f32), **optional,
                            **dict.fromkeys(("L", "H", "K", "V", "nchunks"), i32),
                            **dict.fromkeys([*consts, "HAS_INIT", "STORE_STATES", "PRECISION"]))
                for flag, precision in ((False, "ieee"), (True, "tf32x3"), (True, "tf32")):
                    specs.append((dr, "_delta_chunk_fwd_kernel", walk,
                                   dict(consts, HAS_INIT=flag, STORE_STATES=flag, PRECISION=precision)))
    for dtype in ("*fp32", "*bf16"):
        for has_g in (False, True):
            step = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr"), dtype), state_ptr=f32, beta_ptr=f32,
                        g_ptr=f32 if has_g else None, scale="fp32", K=i32, V=i32, HAS_G=None, BK=None, BV=None)
            specs.append((dec, "_delta_step_kernel", step, dict(HAS_G=has_g, BK=64, BV=32)))
        for has_g, vec in ((False, False), (True, False), (True, True)):
            for bonus in (False, True):
                for normalize in (False, True):
                    la = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), dtype), state_ptr=f32, o_ptr=f32,
                              g_ptr=f32 if has_g else None, u_ptr=f32 if bonus else None, scale="fp32",
                              **dict.fromkeys(("H", "K", "V", "W"), i32),
                              **dict.fromkeys(("HAS_G", "VEC", "BONUS", "NORMALIZE", "BK", "BV")))
                    specs.append((dec, "_la_step_kernel", la, dict(HAS_G=has_g, VEC=vec, BONUS=bonus,
                                                                     NORMALIZE=normalize, BK=64, BV=32)))
    return specs


def test_delta_rule_and_decode_kernels_compile_for_sm90_front_end():
    """The interpreter runs code the GPU compiler rejects; lower every flag combination to Triton IR for sm_90 in a
    clean process (no GPU needed)."""
    assert_compiles_for_sm90(sm90_payload(_specialisations()))
