"""The Triton linear-attention kernels equal the per-timestep recurrence (float64 ``ref``), forward and gradients,
for no decay, a per-head and a per-key-channel decay, with the RWKV bonus u, the normaliser, an initial state and
packed documents (the decode step's kernel is tested in test_triton_delta_rule.py).

On the CPU these run under TRITON_INTERPRET=1 (``make test`` sets it) on small shapes; on a CUDA machine natively.
Tolerance: relative error ||out - ref|| / ||ref|| <= 1e-4 for float32 inputs (float32 accumulation); bf16 inputs
within 1e-2 of the float64 reference on the same (rounded) values. NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
from triton_compile import assert_compiles_for_sm90
from triton_family_checks import (
    check_against_ref,
    float64_randn,
    needs_triton,
    on_device,
    random_documents,
    sm90_payload,
)

from seqlab.ops.linear_attention import linear_attention

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.triton, needs_triton]


def make_inputs(batch, seqlen, nheads, dk, dv, *, decay, bonus=False, normalize=False, initial_state=False,
                docs=False, strength=1.0, seed=0):
    """float64 inputs on DEVICE; ``strength`` scales the log-decays (uniform in [-strength, 0])."""
    gen = torch.Generator().manual_seed(seed)
    randn = float64_randn(gen)
    kw = dict(q=randn(batch, seqlen, nheads, dk), k=randn(batch, seqlen, nheads, dk),
              v=randn(batch, seqlen, nheads, dv))
    if normalize:  # positive features, as a feature map gives
        kw["q"], kw["k"] = kw["q"].exp(), kw["k"].exp()
    if decay != "none":
        shape = (batch, seqlen, nheads) + ((dk,) if decay == "channel" else ())
        kw["g"] = -strength * torch.rand(*shape, generator=gen, dtype=torch.float64)
    if bonus:
        kw["u"] = randn(nheads, dk)
    if initial_state:
        kw["initial_state"] = randn(batch, nheads, dk, dv + int(normalize)).abs()
    if docs:
        kw["seq_idx"] = random_documents(batch, seqlen, gen)
    return on_device(kw)


def _check(kw, dtype=torch.float32, tol=1e-4, **options):
    ref_options = {"normalize": options.get("normalize", False)}
    check_against_ref(linear_attention, kw, dtype, tol, ref_options=ref_options, **options)


CASES = [  # (batch, seqlen, nheads, dk, dv, chunk_size, decay, bonus, normalize, initial_state, docs)
    (1, 16, 1, 16, 16, 16, "none", False, False, False, False),
    (2, 37, 2, 5, 3, 16, "head", False, False, True, False),  # ragged last chunk, K and V not powers of two
    (2, 45, 2, 8, 6, 64, "head", False, False, False, True),  # one chunk holding several documents
    (1, 70, 3, 4, 7, 16, "head", False, True, True, True),  # normaliser + documents across chunk boundaries
    (2, 33, 1, 20, 18, 32, "none", False, True, False, True),
    (1, 1, 2, 3, 2, 64, "head", False, False, True, False),  # a single position
    (2, 37, 2, 5, 3, 64, "channel", False, False, True, False),  # GLA-style decay: 16-long chunks
    (1, 50, 2, 8, 6, 16, "channel", False, True, True, True),
    (2, 16, 1, 16, 16, 16, "channel", False, False, False, False),
    (2, 41, 2, 8, 8, 16, "channel", True, False, True, True),  # RWKV-6: per-channel decay + bonus
    (1, 29, 2, 5, 4, 32, "head", True, False, True, False),
    (1, 20, 1, 4, 4, 16, "none", True, True, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_attention_triton_matches_ref_forward_and_gradients(case):
    batch, seqlen, nheads, dk, dv, chunk_size, decay, bonus, normalize, init, docs = case
    kw = make_inputs(batch, seqlen, nheads, dk, dv, decay=decay, bonus=bonus, normalize=normalize, initial_state=init,
                     docs=docs, seed=seqlen)
    _check(kw, chunk_size=chunk_size, normalize=normalize)


@pytest.mark.parametrize("decay, bonus", [("head", False), ("channel", False), ("channel", True)])
def test_linear_attention_triton_strong_decays_stay_finite_and_exact(decay, bonus):
    kw = make_inputs(2, 50, 2, 8, 8, decay=decay, bonus=bonus, initial_state=True, strength=40.0, seed=3)
    _check(kw, chunk_size=64)


def test_linear_attention_triton_bf16_inputs_within_1e_2():
    kw = make_inputs(1, 40, 2, 16, 16, decay="head", initial_state=True, seed=4)
    _check(kw, dtype=torch.bfloat16, tol=1e-2, chunk_size=32)


# ----------------------------------------------------------------------------------------- GPU front end on CPU


def _specialisations():
    """(module, kernel, signature, constexprs) of every flag combination the wrapper can launch."""
    from seqlab.ops.triton import linear_attention as la

    f32, i32 = "*fp32", "i32"
    specs = []
    for has_g, vec in ((False, False), (True, False), (True, True)):
        for bonus in (False, True):
            for has_doc in (False, True):
                for T, BK, BV in ((16, 16, 16),) if vec else ((16, 16, 16), (64, 32, 64)):
                    consts = dict(HAS_G=has_g, VEC=vec, BONUS=bonus, HAS_DOC=has_doc, IEEE=True, T=T, BK=BK, BV=BV)
                    optional = {"g_ptr": f32 if has_g else None, "u_ptr": f32 if bonus else None,
                                "doc_ptr": "*i32" if has_doc else None}
                    sizes = dict.fromkeys(("L", "H", "K", "V", "nchunks"), i32)
                    fwd = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "init_ptr", "o_ptr", "states_ptr",
                                              "final_ptr"), f32), **optional, **sizes)
                    fwd.update(dict.fromkeys([*consts, "HAS_INIT"]))
                    specs.append((la, "_la_fwd_kernel", fwd, dict(consts, HAS_INIT=True)))
                    bwd = dict(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "states_ptr", "do_ptr", "dfinal_ptr",
                                              "dq_ptr", "dk_ptr", "dv_ptr", "dinit_ptr"), f32), **optional, **sizes)
                    bwd.update(dg_ptr=f32 if has_g else None, du_ptr=f32 if bonus else None)
                    bwd.update(dict.fromkeys([*consts, "HAS_DFINAL"]))
                    specs.append((la, "_la_bwd_kernel", bwd, dict(consts, HAS_DFINAL=True)))
    return specs


def test_linear_attention_kernels_compile_for_sm90_front_end():
    """The interpreter runs code the GPU compiler rejects; lower every flag combination to Triton IR for sm_90 in a
    clean process (no GPU needed)."""
    assert_compiles_for_sm90(sm90_payload(_specialisations()))
