"""MambaForCausalLM and FalconMambaForCausalLM <-> seqlab ``mamba`` / ``falcon-mamba`` (pattern "M", no MLP).

transformers layout: ``backbone.embeddings``, ``backbone.layers.i.{norm, mixer.*}``, ``backbone.norm_f``,
``lm_head`` (tied by default). Falcon Mamba adds weightless RMSNorms on dt, B and C with their own eps
(``mixer_rms_eps``), which is our ``bcdt_norm`` with ``bcdt_norm_eps``.

``residual_in_fp32`` is accepted either way: seqlab's parameters, and so its residual stream, are float32, which is
what both settings compute for a float32 model (they differ only for half-precision weights).
"""

from __future__ import annotations

from seqlab.errors import ConfigError
from seqlab.interop.hf_common import HFConfig, mamba_pairs
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("MambaForCausalLM", "FalconMambaForCausalLM")
MODEL_TYPES = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    falcon = hf.architecture == "FalconMambaForCausalLM"
    hf.check_silu()
    hf.check_neutral()
    d = hf.int("hidden_size")
    expand = hf.int("expand", 2)
    if hf.has("intermediate_size") and hf.get("intermediate_size") != expand * d:
        hf.refuse("intermediate_size", f"seqlab's Mamba has d_inner = expand * hidden_size = {expand * d}")
    hf.expect("residual_in_fp32", (True, False), "expected a boolean", True)
    return ModelConfig(
        preset="falcon-mamba" if falcon else "mamba",
        d_model=d,
        n_layers=hf.int("num_hidden_layers"),
        pattern="M",
        vocab_size=hf.int("vocab_size"),
        pad_vocab_to_multiple=1,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        initializer_range=float(hf.get("initializer_range", 0.1)),
        rescale_prenorm_residual=bool(hf.get("rescale_prenorm_residual", False)),
        mlp="none",
        d_state=hf.int("state_size"),
        d_conv=hf.int("conv_kernel", 4),
        expand=expand,
        dt_rank=hf.dt_rank("time_step_rank", d),
        dt_min=float(hf.get("time_step_min", 0.001)),
        dt_max=float(hf.get("time_step_max", 0.1)),
        dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
        conv_bias=bool(hf.get("use_conv_bias", True)),
        proj_bias=bool(hf.get("use_bias", False)),
        bcdt_norm=falcon,
        bcdt_norm_eps=float(hf.get("mixer_rms_eps", 1e-6)) if falcon else None,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    out = [("embedding.weight", "backbone.embeddings.weight"), ("norm_f.weight", "backbone.norm_f.weight")]
    for i in range(config.n_layers):
        out.append((f"layers.{i}.norm.weight", f"backbone.layers.{i}.norm.weight"))
        out += mamba_pairs(f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer.", config)
    if not config.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    return out


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    problems = []
    if set(config.layer_kinds()) != {"M"}:
        problems.append(f"pattern must be all Mamba layers ('M'), got {''.join(config.layer_kinds())!r}")
    if config.channel_mixer(0) != "none" or config.mlp != "none":
        problems.append(f"mlp must be 'none' ({arch} has no MLP), got {config.mlp!r}")
    falcon = arch == "FalconMambaForCausalLM"
    if config.bcdt_norm != falcon:
        problems.append(f"bcdt_norm must be {falcon} for {arch}, got {config.bcdt_norm}")
    if config.bcdt_norm_weight:
        problems.append("bcdt_norm_weight must be False (the dt/B/C norms of Mamba checkpoints have no weights)")
    return problems


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    falcon = arch == "FalconMambaForCausalLM"
    d_inner = config.expand * config.d_model
    out = {
        "model_type": "falcon_mamba" if falcon else "mamba",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.initializer_range,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": d_inner,
        "time_step_rank": _dt_rank(config),
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.proj_bias,
        "hidden_act": "silu",
        "residual_in_fp32": True,
    }
    if falcon:
        out["mixer_rms_eps"] = config.norm_eps if config.bcdt_norm_eps is None else config.bcdt_norm_eps
    return out


def _dt_rank(config: ModelConfig) -> int:
    if config.dt_rank == "auto":
        return -(-config.d_model // 16)
    if not isinstance(config.dt_rank, int):
        raise ConfigError(f"config.dt_rank: expected 'auto' or an integer, got {config.dt_rank!r}")
    return config.dt_rank
