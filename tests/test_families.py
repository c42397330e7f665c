"""Specification of the O(n) families beyond Mamba (linear Transformer / GLA, RWKV, Griffin, mLSTM): every preset
decodes token by token (and prefills in chunks) to the logits of one parallel forward, keeps packed documents
apart, and allocates exactly the state bytes it reports; the mixers' options do the same at mixer level.

fp32 throughout, compared at 1e-4 (logits are O(1) with initializer_range 0.2).
"""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import ConfigError
from seqlab.mixers import MIXERS
from seqlab.models import ModelConfig
from seqlab.models.config import parse_pattern
from seqlab.models.presets import PRESETS, from_preset

ATOL, RTOL = 1e-4, 1e-4
FAMILIES = [p for p in ("linear-transformer", "rwkv6", "griffin", "mlstm", "rwkv7") if p in PRESETS]
# mixer-level variants: (token, config overrides)
VARIANTS = {
    "linear": ("L", dict(la_mode="linear")),
    "gla": ("L", dict(la_mode="gla")),
    "rwkv6": ("R6", dict(rwkv_headdim=8, rwkv_lora_rank=4, rwkv_decay_rank=4)),
    "rwkv-cmix": ("RC", dict()),
    "griffin": ("G", dict()),
}
if "XL" in MIXERS:
    VARIANTS["mlstm"] = ("XL", dict())
if "R7" in MIXERS:
    VARIANTS["rwkv7"] = ("R7", dict(rwkv_headdim=8, rwkv_lora_rank=4, rwkv_decay_rank=4, rwkv_gate_rank=4))
TINY = dict(d_model=32, n_heads=2, la_chunk_size=4)


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return from_preset(name, "tiny", initializer_range=0.2).eval()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def mixer(variant: str, seed: int = 0):
    token, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    m = MIXERS[token].from_config(ModelConfig(**{**TINY, **overrides}), 0)
    with torch.no_grad():  # push every parameter away from its (often zero) init so each one matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("preset", FAMILIES)
def test_decode_matches_parallel_forward(preset):
    model = tiny(preset)
    ids = random_ids(2, 13, seed=1)
    with torch.no_grad():
        parallel = model(ids)
        state = model.allocate_state(2, 13)
        steps = torch.cat([model(ids[:, t : t + 1], state=state) for t in range(13)], dim=1)
        amnesic = torch.cat([model(ids[:, t : t + 1], state=model.allocate_state(2, 1)) for t in range(13)], dim=1)
    torch.testing.assert_close(steps, parallel, atol=ATOL, rtol=RTOL)
    assert (amnesic[:, 1:] - parallel[:, 1:]).abs().max() > 1e-2  # the state matters, so this test can fail


@pytest.mark.parametrize("preset", FAMILIES)
def test_chunked_prefill_matches_one_shot(preset):
    model = tiny(preset, seed=2)
    ids = random_ids(2, 17, seed=3)
    with torch.no_grad():
        one_shot = model(ids)
        state = model.allocate_state(2, 17)
        chunks = [model(ids[:, a:b], state=state) for a, b in [(0, 5), (5, 6), (6, 16), (16, 17)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_documents_match_separate_forwards(preset):
    model = tiny(preset, seed=4)
    a, b = random_ids(1, 7, seed=5), random_ids(1, 6, seed=6)
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_idx=torch.tensor([[0] * 7 + [1] * 6]))
        separate = torch.cat([model(a), model(b)], dim=1)
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("preset", FAMILIES)
def test_state_bytes_equals_allocated_tensors_and_does_not_grow_with_length(preset):
    model = tiny(preset)
    for batch, seqlen in [(1, 8), (3, 20)]:
        assert model.allocate_state(batch, seqlen).nbytes() == model.state_bytes(batch, seqlen)
    if preset != "griffin":  # Griffin's local attention keeps a window-sized KV cache, constant past the window
        assert model.state_bytes(1, 10) == model.state_bytes(1, 10_000)
    else:
        assert model.state_bytes(1, 100) == model.state_bytes(1, 10_000)


@pytest.mark.parametrize("preset", FAMILIES)
def test_small_size_is_a_cpu_sized_model(preset):
    with torch.device("meta"):
        model = from_preset(preset, "small")
    assert 1e6 <= model.num_params() <= 5.1e6


def test_griffin_layout_two_recurrent_blocks_per_local_mqa_attention():
    model = from_preset("griffin", "tiny")
    assert [b.kind for b in model.layers] == ["G", "G", "A"]
    attn = model.layers[2].mixer
    assert attn.n_kv_heads == 1 and attn.window == model.config.attn_window


def test_pattern_tokens_of_the_families():
    assert parse_pattern("R6 RC R7 G L XL M2 M") == ["R6", "RC", "R7", "G", "L", "XL", "M2", "M"]
    with pytest.raises(ConfigError, match="pattern"):
        ModelConfig(pattern="R").validate()


# ------------------------------------------------------------------------------------------------- mixers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_decode_and_chunks_match_parallel(variant):
    m = mixer(variant)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        parallel = m(x)
        state = m.allocate_state(2, 11)
        steps = torch.cat([m(x[:, t : t + 1], state=state) for t in range(4)], dim=1)
        rest = m(x[:, 4:], state=state)
    torch.testing.assert_close(torch.cat([steps, rest], dim=1), parallel, atol=ATOL, rtol=RTOL)
    assert state.offset == 11
    assert m.allocate_state(3, 5).nbytes() == m.state_bytes(3, 5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_packed_documents_match_separate_calls(variant):
    m = mixer(variant, seed=1)
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(8))
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = m(x, seq_idx=seq_idx)
        separate = torch.cat([m(x[:, :5]), m(x[:, 5:])], dim=1)
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_gradients_reach_every_parameter(variant):
    m = mixer(variant).train()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(9), requires_grad=True)
    m(x).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().max() == 0]
    assert not missing
    assert torch.isfinite(x.grad).all()


# -------------------------------------------------------------------------------------------- mLSTM cell


def _mlstm_inputs(seed, B=2, H=2, L=19, P=3, gate_scale=20.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # input-gate pre-activations up to ~±40: exp(ĩ) alone would overflow float32 without the stabiliser
    q, k, v = randn(B, H, L, P), randn(B, H, L, P), randn(B, H, L, P)
    log_i = gate_scale * randn(B, H, L)
    log_f = torch.nn.functional.logsigmoid(3 * randn(B, H, L))
    C0, n0, m0 = randn(B, H, P, P), randn(B, H, P), randn(B, H)
    return q, k, v, log_i, log_f, C0, n0, m0


@pytest.mark.parametrize("packed", [False, True])
def test_mlstm_parallel_form_equals_the_stabilised_recurrence(packed):
    from seqlab.mixers.mlstm import mlstm_parallel, mlstm_step

    q, k, v, log_i, log_f, C0, n0, m0 = _mlstm_inputs(seed=10)
    seq_idx = torch.tensor([[0] * 6 + [1] * 13, [0] * 18 + [1]]) if packed else None
    h, (C, n, m) = mlstm_parallel(q, k, v, log_i, log_f, C0, n0, m0, seq_idx=seq_idx)
    Cr, nr, mr = C0.clone(), n0.clone(), m0.clone()
    starts = torch.zeros(2, 19, dtype=torch.bool) if seq_idx is None else seq_idx.diff(prepend=seq_idx[:, :1]) != 0
    steps = []
    for t in range(19):
        lf = log_f[..., t].masked_fill(starts[:, t, None], float("-inf"))  # a document start forgets everything
        steps.append(mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], log_i[..., t], lf, Cr, nr, mr))
    hr = torch.stack(steps, dim=2)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, hr, rtol=1e-9, atol=1e-9)
    # the stabilised states match once rescaled to the same m
    torch.testing.assert_close(m, mr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(C, Cr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(n, nr, rtol=1e-9, atol=1e-9)


def test_mlstm_parallel_gradients_pass_gradcheck():
    from seqlab.mixers.mlstm import mlstm_parallel

    inputs = [t[:1, :1, :6].clone() if t.dim() >= 3 and t.shape[2] == 19 else t[:1, :1].clone()
              for t in _mlstm_inputs(seed=11, gate_scale=2.0)]
    for t in inputs:
        t.requires_grad_(True)

    def fn(*tensors):
        h, (C, n, m) = mlstm_parallel(*tensors)
        return h, C, n

    assert torch.autograd.gradcheck(fn, tuple(inputs))
