"""Recurrent states kept in a 16-bit float (``allocate_state(..., state_dtype=...)``): Mamba and Mamba-2 layers.

Tolerances: decoding with a bfloat16 state against the parallel float32 forward, relative error of the logits
<= 2e-2 over 12 tokens (each step rounds the state once to bfloat16's 8-bit mantissa); float32 states stay at
the usual 1e-4. Runs on the torch paths on the CPU and, under TRITON_INTERPRET=1, on the Triton step kernels.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import InputError
from seqlab.models.presets import from_preset


def _model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return from_preset(preset, "tiny").eval()


def _decode_logits(model, ids, state):
    """Prefill the first half in one call, then one token at a time; logits (B, L, V)."""
    half = ids.shape[1] // 2
    outs = [model(ids[:, :half], state=state)]
    for t in range(half, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], state=state))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("preset", ["mamba", "mamba2", "jamba"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_decode_with_a_16bit_state_tracks_the_parallel_forward(preset, state_dtype):
    model = _model(preset, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        state = model.allocate_state(2, 16, state_dtype=state_dtype)
        got = _decode_logits(model, ids, state)
    recurrent = [t for name, t in state.named_tensors().items() if "conv" in name or "ssm" in name]
    assert recurrent and all(t.dtype == state_dtype for t in recurrent)
    err = ((got - full).norm() / full.norm()).item()
    assert err <= (1e-4 if state_dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("preset", ["mamba", "mamba2"])
def test_a_bfloat16_state_has_half_the_bytes_and_state_bytes_says_so(preset):
    model = _model(preset)
    full = model.allocate_state(3, 8)
    half = model.allocate_state(3, 8, state_dtype=torch.bfloat16)
    assert half.nbytes() * 2 == full.nbytes()
    assert model.state_bytes(3, 8, state_dtype=torch.bfloat16) == half.nbytes()
    assert model.state_bytes(3, 8) == full.nbytes()


def test_attention_layers_keep_their_cache_dtype():
    model = _model("transformer")
    a = model.allocate_state(1, 8)
    b = model.allocate_state(1, 8, state_dtype=torch.bfloat16)
    assert {k: t.dtype for k, t in a.named_tensors().items()} == {k: t.dtype for k, t in b.named_tensors().items()}


def test_an_unsupported_state_dtype_is_refused_by_name():
    model = _model("mamba")
    with pytest.raises(InputError, match="state_dtype"):
        model.allocate_state(1, 8, state_dtype=torch.int8)
