"""Specification of LanguageModel and the presets: decoding token by token (or in chunks) with a state gives the
logits of one parallel forward for every family; published sizes have the published parameter counts; configs
round-trip through JSON and bad names or fields raise ConfigError."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.models import LanguageModel, ModelConfig
from seqlab.models.config import parse_pattern
from seqlab.models.presets import PRESETS, SIZES, from_preset, preset_config, sizes_of

# fp32 throughout; logits are O(1) (initializer_range 0.2 makes every mixer matter), compared at 1e-4
ATOL, RTOL = 1e-4, 1e-4
PRESET_OVERRIDES = {name: {} for name in PRESETS} | {"hybrid": {"pattern": "M2 A"}}


def tiny(name: str, seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    model = from_preset(name, "tiny", initializer_range=0.2, **{**PRESET_OVERRIDES[name], **overrides})
    return model.eval()


def random_ids(batch: int, length: int, seed: int, vocab: int = 259) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- state == parallel


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_matches_parallel_forward(preset):
    model = tiny(preset)
    ids = random_ids(2, 13, seed=1)
    with torch.no_grad():
        parallel = model(ids)  # (B, L, V)
        state = model.allocate_state(2, ids.shape[1])
        steps = torch.cat([model(ids[:, t : t + 1], state=state) for t in range(ids.shape[1])], dim=1)
        # control: without a carried state the steps must differ, or this test could not fail
        amnesic = torch.cat(
            [model(ids[:, t : t + 1], state=model.allocate_state(2, 1)) for t in range(ids.shape[1])], dim=1
        )
    assert parallel.dtype == torch.float32 and parallel.shape == (2, 13, model.config.vocab_size_padded)
    torch.testing.assert_close(steps, parallel, atol=ATOL, rtol=RTOL)
    assert state.offset == ids.shape[1]
    assert (amnesic[:, 1:] - parallel[:, 1:]).abs().max() > 1e-2


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_matches_one_shot(preset):
    model = tiny(preset, seed=2)
    L = 17
    ids = random_ids(2, L, seed=3)
    g = torch.Generator().manual_seed(hash(preset) % 1000)
    cuts = sorted(torch.randperm(L - 1, generator=g)[:3].add(1).tolist())  # 3 random cut points in 1..L-1
    with torch.no_grad():
        one_shot = model(ids)
        state = model.allocate_state(2, L)
        bounds = [0, *cuts, L]
        chunks = [model(ids[:, a:b], state=state) for a, b in zip(bounds[:-1], bounds[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("preset", ["transformer", "mamba", "mamba2", "s4", "zamba"])
def test_packed_documents_match_separate_forwards(preset):
    model = tiny(preset, seed=4)
    a, b = random_ids(1, 7, seed=5), random_ids(1, 6, seed=6)
    seq_idx = torch.tensor([[0] * 7 + [1] * 6])
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_idx=seq_idx)
        separate = torch.cat([model(a), model(b)], dim=1)
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("preset", PRESETS)
def test_state_bytes_equals_allocated_tensors(preset):
    model = tiny(preset)
    for batch, seqlen in [(1, 8), (3, 20)]:
        state = model.allocate_state(batch, seqlen)
        assert state.nbytes() == model.state_bytes(batch, seqlen)


def test_ssm_state_size_does_not_depend_on_length_but_kv_cache_does():
    mamba, transformer = tiny("mamba"), tiny("transformer")
    assert mamba.state_bytes(1, 10) == mamba.state_bytes(1, 100_000)
    c = transformer.config
    kv_per_position = c.n_layers * 2 * c.d_model * 4  # K and V of every layer, fp32
    assert transformer.state_bytes(1, 200) - transformer.state_bytes(1, 100) == 100 * kv_per_position


def test_state_for_another_batch_is_rejected():
    model = tiny("mamba")
    with pytest.raises(InputError, match="state"):
        model(random_ids(2, 3, seed=0), state=model.allocate_state(1, 3))


# --------------------------------------------------------------------------------------------- the stack


def test_pattern_is_tokenised_and_cycled():
    assert parse_pattern("M2 M2A  S M") == ["M2", "M2", "A", "S", "M"]
    config = ModelConfig(pattern="M2 A", n_layers=5)
    assert config.layer_kinds() == ["M2", "A", "M2", "A", "M2"]
    model = from_preset("hybrid", "tiny", pattern="MMA", n_layers=4)
    assert [type(b.mixer).__name__ for b in model.layers] == ["Mamba", "Mamba", "Attention", "Mamba"]


def test_the_tiny_hybrid_builds_any_pattern():
    """Every layer kind fits the tiny hybrid's width (RWKV's heads included)."""
    ids = torch.randint(0, 32, (1, 8))
    for pattern in ("R6 RC", "R7 M2", "G L XL"):
        model = from_preset("hybrid", "tiny", pattern=pattern, n_layers=2, vocab_size=32)
        assert model(ids).shape == (1, 8, 32), pattern


@pytest.mark.parametrize("pattern", ["MXA", "", "m", "M3"])
def test_unknown_pattern_token_is_a_config_error_naming_pattern(pattern):
    with pytest.raises(ConfigError, match="pattern"):
        ModelConfig(pattern=pattern).validate()


def test_jamba_layout_attention_at_index_4_and_moe_every_other_layer():
    model = from_preset("jamba", "tiny")
    assert "".join(b.kind for b in model.layers) == "MMMMAMMM"
    assert [b.channel for b in model.layers] == ["swiglu", "moe"] * 4
    assert preset_config("jamba", "52b").n_experts == 16 and preset_config("jamba", "52b").moe_top_k == 2


def test_moe_aux_loss_is_weighted_and_zero_without_moe():
    model = tiny("jamba").train()
    model(random_ids(2, 8, seed=0))
    raw = sum(b.mlp.aux_loss for b in model.layers if b.channel == "moe")
    assert model.aux_loss.dim() == 0 and model.aux_loss > 0
    torch.testing.assert_close(model.aux_loss, model.config.moe_aux_loss_weight * raw)
    dense = tiny("transformer").train()
    dense(random_ids(2, 8, seed=0))
    assert float(dense.aux_loss) == 0.0


def test_zamba_shares_one_block_with_its_own_cache_per_application():
    model = from_preset("zamba", "small")  # 12 layers, shared block every 6
    assert model.shared_before == {5: 0, 11: 1}
    assert len(model.shared_proj) == 2
    attn_params = sum(p.numel() for p in model.shared_block.parameters())
    with_copies = model.num_params() + attn_params  # a second copy of the block would add this many
    assert model.num_params() < with_copies
    state = model.allocate_state(1, 8)
    assert len(state.shared) == 2 and state.shared[0]["k"] is not state.shared[1]["k"]
    assert model.shared_block.attn.d_model == 2 * model.config.d_model  # reads [h, x_emb]


def test_tied_and_untied_heads():
    tied = from_preset("mamba", "tiny")
    assert tied.lm_head.weight is tied.embedding.weight
    untied = from_preset("mamba", "tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embedding.weight
    V, d = tied.config.vocab_size_padded, tied.config.d_model
    assert V == 264 and V % 8 == 0
    assert untied.num_params() == tied.num_params() + V * d
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)


def test_published_init():
    torch.manual_seed(0)
    model = from_preset("mamba", "small")
    std = model.config.initializer_range
    assert abs(model.embedding.weight.std().item() - std) < 0.1 * std
    mixer = model.layers[0].mixer
    assert abs(mixer.in_proj.weight.std().item() - std) < 0.1 * std
    out_std = mixer.out_proj.weight.std().item()
    expected = std / math.sqrt(model.config.n_layers)  # one residual branch per layer (no MLP)
    assert abs(out_std - expected) < 0.1 * expected
    # the mixer's own inits survive: dt = softplus(dt_proj.bias) in [dt_min, dt_max], dt_proj weight uniform
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= model.config.dt_init_floor * 0.99 and dt.max() <= model.config.dt_max * 1.01
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.abs().max() > 0.5 * bound
    # with an MLP there are two residual branches per layer (GPT-2: 1/sqrt(2 n_layers))
    transformer = from_preset("transformer", "small")
    o = transformer.layers[0].mixer.o_proj.weight.std().item()
    expected = std / math.sqrt(2 * transformer.config.n_layers)
    assert abs(o - expected) < 0.1 * expected


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = from_preset("jamba", "small")
    assert model.embedding.weight.is_meta and model.num_params() > 0


def test_input_ids_are_validated():
    model = tiny("mamba")
    with pytest.raises(InputError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match="input_ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(InputError, match="input_ids"):
        model(torch.full((1, 3), 10_000))


# ------------------------------------------------------------------------------------------ published sizes


@pytest.mark.parametrize(
    "preset, size, published",
    [
        ("mamba", "130m", 129e6),
        ("mamba", "1.4b", 1.37e9),
        ("mamba2", "130m", 129e6),
        ("transformer", "1.3b", 1.3e9),
        ("falcon-mamba", "7b", 7.27e9),
    ],
)
def test_published_parameter_counts(preset, size, published):
    overrides = {} if "vocab_size" in _size_fields(preset, size) else {"vocab_size": 50280}
    with torch.device("meta"):
        model = from_preset(preset, size, **overrides)
    assert abs(model.num_params() / published - 1) < 0.05, model.num_params()


def _size_fields(preset, size):
    from seqlab.models.presets import _SIZES

    return _SIZES[preset][size]


def test_published_shapes():
    c = preset_config("mamba2", "130m")
    assert (c.d_model, c.n_layers, c.ssd_headdim, c.ssd_d_state, c.ssd_ngroups) == (768, 24, 64, 128, 1)
    c = preset_config("mamba", "1.4b")
    assert (c.d_model, c.n_layers) == (2048, 48)
    c = preset_config("transformer", "1.3b")
    assert (c.d_model, c.n_layers, c.n_heads) == (2048, 24, 16)


@pytest.mark.parametrize("preset", PRESETS)
def test_small_size_is_a_cpu_sized_model(preset):
    with torch.device("meta"):
        model = from_preset(preset, "small", **PRESET_OVERRIDES[preset])
    assert 1e6 <= model.num_params() <= 5.1e6


# ------------------------------------------------------------------------------------------------- configs


def test_config_json_round_trip(tmp_path):
    config = preset_config("jamba", "tiny", n_kv_heads=1, dt_rank=4)
    assert ModelConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config


def test_preset_overrides_apply_last():
    config = preset_config("mamba", "small", d_model=96, n_layers=3, vocab_size=50280)
    assert (config.d_model, config.n_layers, config.vocab_size, config.pattern) == (96, 3, 50280, "M")
    assert config.preset == "mamba"
    assert preset_config("falcon-mamba", "tiny").bcdt_norm is True


def test_bad_names_and_fields_are_config_errors():
    with pytest.raises(ConfigError, match="transformer"):  # lists the valid names
        preset_config("gpt5")
    with pytest.raises(ConfigError, match="tiny"):  # lists the valid sizes
        preset_config("mamba", "huge")
    with pytest.raises(ConfigError, match="d_modle"):
        preset_config("mamba", "tiny", d_modle=3)
    with pytest.raises(ConfigError, match="pattern"):
        preset_config("hybrid", "tiny")
    with pytest.raises(ConfigError, match="mlp"):
        preset_config("mamba", "tiny", mlp="relu")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"d_model": 8, "colour": "red"})
    assert set(sizes_of("mamba")) <= set(SIZES)
