"""The memory planner: its formulas against published numbers and against seqlab's own modules."""

from __future__ import annotations

import json

import pytest

from seqlab.bench.memory import (
    ArchSpec,
    attention_score_entries,
    kv_cache_bytes,
    param_count,
    parse_count,
    plan,
    public_specs,
    recurrent_state_bytes,
)
from seqlab.cli import main
from seqlab.errors import ConfigError

GiB = 1024**3


@pytest.mark.parametrize(
    "name", ["llama-3-8b", "llama-3-70b", "mistral-7b", "mixtral-8x7b", "jamba-v0.1", "mamba-2.8b", "mamba2-2.7b",
             "falcon-mamba-7b"],
)
def test_param_count_matches_published(name):
    spec = public_specs()[name]
    assert param_count(spec) == pytest.approx(spec.published_params, rel=0.01)


def test_gqa_kv_cache_is_counted_with_kv_heads_and_the_naive_estimate_is_flagged():
    spec = public_specs()["llama-3-8b"]
    # 32 layers x 2 x 8 kv heads x 128 x 131072 tokens x 2 bytes
    assert kv_cache_bytes(spec, 131072, 1, 2) == 32 * 2 * 8 * 128 * 131072 * 2 == 16 * GiB
    result = plan(spec, 131072, 1, "bf16")
    assert any("4x too much" in note and "64.00 GiB" in note for note in result["notes"])


def test_jamba_kv_cache_at_256k_is_4_gib_as_published():
    # Jamba paper, Table 1: 4GB KV cache at 256K tokens in 16-bit
    assert kv_cache_bytes(public_specs()["jamba-v0.1"], 262144, 1, 2) == 4 * GiB


def test_sliding_window_caps_the_cache_and_the_scores():
    spec = public_specs()["mistral-7b"]
    assert kv_cache_bytes(spec, 131072, 1, 2) == kv_cache_bytes(spec, 4096, 1, 2)
    assert attention_score_entries(spec, 131072) == 32 * 32 * 131072 * 4096


def test_ssm_state_is_constant_in_context_and_linear_in_batch():
    spec = public_specs()["mamba-2.8b"]
    one = plan(spec, 1024, 1)["recurrent_state_bytes"]
    assert plan(spec, 1_048_576, 1)["recurrent_state_bytes"] == one
    assert recurrent_state_bytes(spec, 4, 2) == 4 * one
    # 64 layers x (5120 x 16 fp32 state + 5120 x 3 bf16 conv window)
    assert one == 64 * (5120 * 16 * 4 + 5120 * 3 * 2)
    assert plan(spec, 1024, 1)["kv_cache_bytes"] == 0


def test_moe_notes_active_parameters():
    result = plan(public_specs()["mixtral-8x7b"], 4096)
    assert result["active_params"] == pytest.approx(12.9e9, rel=0.02)


@pytest.mark.parametrize("text,value", [("4096", 4096), ("128k", 131072), ("1m", 1048576), ("1.5k", 1536)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "-5", "1.3"])
def test_parse_count_rejects_bad_text(text):
    with pytest.raises(ConfigError, match="context"):
        parse_count(text)


def test_plan_rejects_unknown_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        plan(ArchSpec(name="x", d_model=8, n_layers=1, vocab_size=10), 16, dtype="fp13")


def test_cli_prints_table_and_json(capsys):
    assert main(["memory", "--model", "llama-3-8b", "--model", "mamba-2.8b", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-8b" in out and "mamba-2.8b" in out and "too much" in out
    assert main(["memory", "--model", "jamba-v0.1", "--context", "256k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["kv_cache_bytes"] == 4 * GiB


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert main(["memory", "--model", "no-such-model"]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset,size,overrides",
    [
        ("transformer", "small", {"n_kv_heads": 2}),
        ("s4", "small", {}),
        ("mamba", "small", {}),
        ("falcon-mamba", "tiny", {}),
        ("mamba2", "small", {}),
        ("jamba", "small", {}),
        ("hybrid", "tiny", {"pattern": "M2 A S M"}),
        ("transformer", "tiny", {"attn_window": 8}),
        ("rwkv6", "tiny", {}),
        ("griffin", "tiny", {}),
        ("mlstm", "tiny", {}),
        ("linear-transformer", "tiny", {}),
        ("rwkv7", "tiny", {}),
        ("hybrid", "tiny", {"pattern": "M2 L A"}),
    ],
)
def test_planner_matches_the_real_modules(preset, size, overrides):
    """Parameter count and state bytes from the formulas equal what the built model holds."""
    import torch

    from seqlab.bench.memory_presets import spec_from_config
    from seqlab.models import LanguageModel
    from seqlab.models.presets import preset_config

    config = preset_config(preset, size, **overrides)
    with torch.device("meta"):
        model = LanguageModel(config)
    spec = spec_from_config(config)
    assert param_count(spec) == model.num_params()
    for seqlen in (1, 40):
        planned = plan(spec, seqlen, batch=2, dtype="fp32")
        # the attention cache also keeps one int64 document-start index per sequence, which the planner leaves out
        bookkeeping = spec.attn_layers * 2 * 8
        assert planned["inference_state_bytes"] + bookkeeping == model.state_bytes(2, seqlen, torch.float32)


def test_zamba_preset_plans_the_shared_block_cache():
    from seqlab.bench.memory_presets import resolve_spec

    spec = resolve_spec("zamba:tiny")
    assert spec.shared_attention and spec.attn_layers == 2 and spec.mamba_layers == 4
    assert plan(spec, 1000)["kv_cache_bytes"] > plan(spec, 10)["kv_cache_bytes"]


def test_chunked_prefill_bounds_activations_but_not_the_cache():
    spec = public_specs()["llama-3-8b"]
    one_shot, chunked = plan(spec, 131072), plan(spec, 131072, prefill_chunk=4096)
    assert chunked["kv_cache_bytes"] == one_shot["kv_cache_bytes"]
    assert chunked["activation_bytes"] < one_shot["activation_bytes"] / 16
    assert chunked["activation_bytes"] == plan(spec, 4096)["activation_bytes"]
