"""Checks shared by the Triton tests of the linear-recurrence families (delta rule, linear attention).

``check_against_ref`` runs an op with its float64 ``ref`` backend and with ``backend="triton"`` on the same (rounded)
inputs, back-propagates one random projection of output and final state through both, and asserts the relative
error ||out - ref|| / ||ref|| of the output, the final state and every floating-point input's gradient is within
``tol``. NaN never passes.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; infinity when ``out`` holds a NaN or an infinity."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def float64_randn(gen):
    """``randn(*shape)`` drawing float64 normals from ``gen``."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    return randn


def random_documents(batch, seqlen, gen):
    """(batch, seqlen) int32 document ids with a cut before ~15% of positions (never the first)."""
    cuts = (torch.rand(batch, seqlen, generator=gen) < 0.15).long()
    cuts[:, 0] = 0
    return (cuts.cumsum(1) % 3).to(torch.int32)  # non-monotone ids: a reset is any change


def on_device(kw):
    return {name: t.to(DEVICE) for name, t in kw.items()}


def run_with_grad_leaves(op, kw, dtype, backend, **options):
    """Call ``op`` on copies of ``kw`` (floating ones cast to ``dtype`` and requiring grad) -> (leaves, o, S)."""
    leaves = {n: (t.to(dtype).detach().requires_grad_(True) if t.is_floating_point() else t) for n, t in kw.items()}
    o, S = op(**leaves, **options, backend=backend, return_final_state=True)
    return leaves, o, S


def check_against_ref(op, kw, dtype=torch.float32, tol=1e-4, ref_options=None, **options):
    """Triton vs float64 ref on ``kw`` rounded to ``dtype``: output, final state (float32) and all gradients within
    ``tol``. ``options`` go to the Triton call, ``ref_options`` to the ref call."""
    rounded = {n: t.to(dtype).double() if t.is_floating_point() else t for n, t in kw.items()}  # bf16: same values
    ref_leaves, o_ref, S_ref = run_with_grad_leaves(op, rounded, torch.float64, "ref", **(ref_options or {}))
    leaves, o, S = run_with_grad_leaves(op, rounded, dtype, "triton", **options)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_S = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ((o_ref * w_o).sum() + (S_ref * w_S).sum()).backward()
    ((o.double() * w_o).sum() + (S.double() * w_S).sum()).backward()
    assert o.dtype == dtype and S.dtype == torch.float32
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(S, S_ref)}
    grads = [n for n in leaves if leaves[n].is_floating_point()]
    errors.update({f"d{n}": rel_err(leaves[n].grad, ref_leaves[n].grad) for n in grads})
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"


def sm90_payload(specs):
    """``triton_compile`` payload from (module, kernel name, {param: type or None for constexpr}, constexpr values)
    items; asserts each signature names exactly the kernel's parameters."""
    payload = []
    for module, name, sig, consts in specs:
        params = list(inspect.signature(getattr(module, name).fn).parameters)
        assert set(params) == set(sig), (name, sorted(set(params) ^ set(sig)))
        signature = {p: ("constexpr" if sig[p] is None else sig[p]) for p in params}
        constexprs = [[params.index(p), consts.get(p)] for p in params if sig[p] is None]
        payload.append((module.__name__, name, signature, constexprs))
    return payload
