"""Mamba's whole decode step as one op (seqlab.ops.mamba_layer) equals the unfused ops it replaces.

The Triton launch runs under TRITON_INTERPRET=1 on the CPU (phase by phase: the interpreter runs programs one after
another, so its grid barriers cannot run there) or natively on CUDA (one persistent launch), on small layers over
consecutive steps with both states carried. Tolerances, relative error of the whole tensor against the plain
PyTorch step (``mamba_layer_step_ref``) of the same inputs:
- float32: <= 1e-5 (the same math; sums in another order, the norm's row scale applied after the GEMM);
- 16-bit: against a float32 evaluation of the same (rounded) weights and inputs, within 3x the error of the unfused
  16-bit step itself, float16 (rounded to nearest like the GPU), and <= 6e-2 for bfloat16 (the interpreter
  truncates float32 -> bfloat16 where the GPU rounds to nearest, which alone doubles the error of every rounding);
- CUDA: the persistent launch and the phase-by-phase launches give the same bits.
"""

from __future__ import annotations

import os

import pytest
import torch

from seqlab.errors import InputError
from seqlab.mixers import base as mixer_base
from seqlab.models.presets import from_preset
from seqlab.ops.mamba_layer import layer_step_fits, mamba_layer_step, mamba_layer_step_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not (_INTERPRET or torch.cuda.is_available()),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_layer(batch=3, d_model=64, d_inner=128, n=16, rank=8, width=4, dtype=torch.float32,
               state_dtype=torch.float32, conv_bias=True, seed=0):
    """(h, weights, conv_state, ssm_state) of a random layer on DEVICE, scaled like a trained one's step."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    weights = dict(
        in_proj_weight=rand(2 * d_inner, d_model).to(dtype), conv_weight=rand(d_inner, width, scale=0.5),
        conv_bias=rand(d_inner) if conv_bias else None, x_proj_weight=rand(rank + 2 * n, d_inner).to(dtype),
        dt_proj_weight=rand(d_inner, rank).to(dtype), dt_proj_bias=rand(d_inner) - 2.0,
        A_log=torch.log(torch.arange(1, n + 1, dtype=torch.float32).repeat(d_inner, 1)) + rand(d_inner, n, scale=0.1),
        D=1.0 + rand(d_inner), out_proj_weight=rand(d_model, d_inner).to(dtype), norm_weight=1.0 + rand(d_model),
    )
    weights = {k: None if v is None else v.to(DEVICE) for k, v in weights.items()}
    h = torch.randn(batch, d_model, generator=gen).to(DEVICE, dtype)
    conv_state = torch.randn(batch, d_inner, width - 1, generator=gen).to(DEVICE, state_dtype)
    ssm_state = torch.randn(batch, d_inner, n, generator=gen).to(DEVICE, state_dtype)
    return h, weights, conv_state, ssm_state


def run_steps(fn, h, weights, conv_state, ssm_state, steps=2, **kw):
    """``steps`` consecutive steps, each fed the previous output: (outputs, conv_state, ssm_state)."""
    conv_state, ssm_state = conv_state.clone(), ssm_state.clone()
    outs = []
    for _ in range(steps):
        h = fn(h, conv_state=conv_state, ssm_state=ssm_state, **weights, **kw)
        outs.append(h)
    return torch.stack(outs), conv_state, ssm_state


LAYERS = {
    "defaults": (dict(), None),
    "batch1-k16-no-split": (dict(batch=1), dict(BLOCK_K_IN=16, BLOCK_K_X=16, BLOCK_K_OUT=16, OUT_SPLIT=1)),
    "batch17-w2-no-bias-narrow": (dict(batch=17, width=2, conv_bias=False), dict(BLOCK_N_IN=32, BLOCK_C=16)),
    "n8-rank5-w3-small-sums": (dict(batch=5, n=8, rank=5, width=3),
                               dict(BLOCK_K_IN=32, BLOCK_K_X=32, BLOCK_E=64, BLOCK_D=16, X_SPLIT=4)),
}


@needs_triton
@pytest.mark.parametrize("case", list(LAYERS))
def test_float32_equals_the_unfused_step(case):
    shape, config = LAYERS[case]
    h, weights, conv, ssm = make_layer(**shape)
    ref = run_steps(mamba_layer_step_ref, h, weights, conv, ssm)
    out = run_steps(mamba_layer_step, h, weights, conv, ssm, backend="triton", config=config)
    for name, a, b in zip(("h_out", "conv_state", "ssm_state"), out, ref):
        assert rel_err(a, b) <= 1e-5, (case, name, rel_err(a, b))


@needs_triton
@pytest.mark.parametrize("eps", [None, 1e-6], ids=["no-pre-norm", "weightless-pre-norm"])
def test_without_a_pre_norm_weight(eps):
    h, weights, conv, ssm = make_layer(batch=2)
    weights["norm_weight"] = None
    ref = run_steps(mamba_layer_step_ref, h, weights, conv, ssm, norm_eps=eps)
    out = run_steps(mamba_layer_step, h, weights, conv, ssm, norm_eps=eps, backend="triton")
    for a, b in zip(out, ref):
        assert rel_err(a, b) <= 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_is_as_close_to_float32_as_the_unfused_step(dtype):
    h, weights, conv, ssm = make_layer(batch=5, dtype=dtype, state_dtype=dtype)
    wide = {k: None if v is None else v.float() for k, v in weights.items()}
    truth = run_steps(mamba_layer_step_ref, h.float(), wide, conv.float(), ssm.float(), steps=1)
    unfused = run_steps(mamba_layer_step_ref, h, weights, conv, ssm, steps=1)
    fused = run_steps(mamba_layer_step, h, weights, conv, ssm, steps=1, backend="triton")
    for name, a, b, t in zip(("h_out", "conv_state", "ssm_state"), fused, unfused, truth):
        bound = 3 * rel_err(b, t) if (dtype == torch.float16 or DEVICE == "cuda") else 6e-2
        assert rel_err(a, t) <= max(bound, 1e-3), (name, rel_err(a, t), rel_err(b, t))


def test_auto_off_cuda_is_the_plain_step_bit_for_bit():
    h, weights, conv, ssm = make_layer(batch=2)
    if DEVICE == "cuda":
        h, weights = h.cpu(), {k: None if v is None else v.cpu() for k, v in weights.items()}
        conv, ssm = conv.cpu(), ssm.cpu()
    ref = run_steps(mamba_layer_step_ref, h, weights, conv, ssm)
    out = run_steps(mamba_layer_step, h, weights, conv, ssm, backend="auto")
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_fits_names_what_the_launch_does_not_take():
    assert layer_step_fits(64, 2048, 4096, 16, 4) is None
    assert "batch 129" in layer_step_fits(129, 2048, 4096, 16, 4)
    assert "d_conv 5" in layer_step_fits(2, 2048, 4096, 16, 5)
    assert "d_state 12" in layer_step_fits(2, 2048, 4096, 12, 4)
    assert "d_model 40" in layer_step_fits(2, 40, 4096, 16, 4)


@pytest.mark.parametrize("name, change, expected", [
    ("ssm_state", lambda w, c, s: (w, c, s[:, :, :8]), "ssm_state"),
    ("conv_state", lambda w, c, s: (w, c.transpose(0, 1).contiguous().transpose(0, 1), s), "contiguous"),
    ("x_proj_weight", lambda w, c, s: ({**w, "x_proj_weight": w["x_proj_weight"][:-1]}, c, s), "x_proj_weight"),
    ("out_proj_weight", lambda w, c, s: ({**w, "out_proj_weight": w["out_proj_weight"].double()}, c, s),
     "dtype"),
])
def test_bad_inputs_are_named(name, change, expected):
    h, weights, conv, ssm = make_layer(batch=2)
    weights, conv, ssm = change(weights, conv, ssm)
    with pytest.raises(InputError, match=name) as info:
        mamba_layer_step(h, conv_state=conv, ssm_state=ssm, **weights)
    assert expected in str(info.value)


@needs_triton
def test_triton_backend_refuses_a_layer_it_does_not_fit():
    h, weights, conv, ssm = make_layer(batch=2, n=12)
    with pytest.raises(InputError, match="d_state 12"):
        mamba_layer_step(h, conv_state=conv, ssm_state=ssm, **weights, backend="triton")


@needs_triton
def test_a_model_decodes_the_same_with_the_layer_launch(monkeypatch):
    torch.manual_seed(0)
    model = from_preset("mamba", "tiny", initializer_range=0.2).eval().to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def decode():
        state = model.allocate_state(3, 16)
        with torch.inference_mode():
            model(ids[:, :7], state=state)
            logits = [model(ids[:, t:t + 1], state=state) for t in range(7, 10)]
        return torch.cat(logits, dim=1), state

    reference, ref_state = decode()
    calls = []
    monkeypatch.setitem(mixer_base.FUSED_DECODE_KERNELS, "layer", True)
    import seqlab.mixers.mamba as mamba_module
    real = mamba_module.mamba_layer_step
    monkeypatch.setattr(mamba_module, "mamba_layer_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, fused_state = decode()
    assert len(calls) == 3 * len(model.layers)
    assert rel_err(fused, reference) <= 1e-5
    for a, b in zip(fused_state.layers, ref_state.layers):
        assert a.offset == b.offset
        for key in ("conv", "ssm"):
            assert rel_err(a[key], b[key]) <= 1e-5


def test_training_mode_steps_never_take_the_launch(monkeypatch):
    monkeypatch.setitem(mixer_base.FUSED_DECODE_KERNELS, "layer", True)
    model = from_preset("mamba", "tiny")
    mixer = model.layers[0].mixer
    x = torch.randn(2, 1, model.config.d_model)
    assert not mixer._layer_step(x, x, model.layers[0].norm)  # grad enabled
    with torch.no_grad():
        assert not mixer._layer_step(x, x.clone(), model.layers[0].norm)  # residual is not the input


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _INTERPRET, reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_persistent_launch_equals_the_phase_by_phase_launches(batch):
    from seqlab.ops.mamba_layer import barrier_failures

    h, weights, conv, ssm = make_layer(batch=batch, d_model=256, d_inner=512, rank=16, dtype=torch.bfloat16,
                                       state_dtype=torch.bfloat16)
    one = run_steps(mamba_layer_step, h, weights, conv, ssm, steps=3, backend="triton")
    phases = run_steps(mamba_layer_step, h, weights, conv, ssm, steps=3, backend="triton",
                       config=dict(persistent=False))
    torch.cuda.synchronize()
    assert barrier_failures(h.device) == 0
    for a, b in zip(one, phases):
        assert torch.equal(a, b)


@needs_triton
def test_after_a_barrier_gave_up_the_output_is_nan_never_a_wrong_number(monkeypatch):
    """A raised failure flag (a persistent launch's barrier that waited too long) poisons every later output."""
    from seqlab.ops import mamba_layer

    monkeypatch.setattr(mamba_layer, "_SYNC", {})
    h, weights, conv, ssm = make_layer(batch=2)
    sync = mamba_layer._sync_buffer(h.device)
    sync[2] = 1
    assert mamba_layer.barrier_failures(h.device) == 1
    out = mamba_layer_step(h, conv_state=conv, ssm_state=ssm, **weights, backend="triton")
    assert torch.isnan(out).all()
    for config in (dict(OUT_SPLIT=1), dict(OUT_SPLIT=2)):
        out = mamba_layer_step(h, conv_state=conv.clone(), ssm_state=ssm.clone(), **weights, backend="triton",
                               config=config)
        assert torch.isnan(out).all(), config


def test_a_persistent_launch_never_asks_for_more_programs_than_an_sm_holds():
    from types import SimpleNamespace

    from seqlab.ops.mamba_layer import _resident_per_sm

    def kernel(regs, shared):
        return SimpleNamespace(n_regs=regs, metadata=SimpleNamespace(shared=shared), _init_handles=lambda: None)

    h200 = {"max_num_regs": 65536, "max_shared_mem": 232448}
    assert _resident_per_sm(kernel(255, 131072), 8, h200) == 1  # the default tiles: one program per SM
    assert _resident_per_sm(kernel(255, 49152), 4, h200) == 2  # registers allow two
    assert _resident_per_sm(kernel(64, 49152), 4, h200) == 4  # shared memory allows four
    assert _resident_per_sm(kernel(64, 49152), 4, {"max_num_regs": 65536, "max_shared_mem": 101376}) == 2
