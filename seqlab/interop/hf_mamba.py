"""MambaForCausalLM and FalconMambaForCausalLM <-> seqlab ``mamba`` / ``falcon-mamba`` (pattern "M", no MLP).

transformers layout: ``backbone.embeddings``, ``backbone.layers.i.{norm, mixer.*}``, ``backbone.norm_f``,
``lm_head`` (tied by default). Falcon Mamba adds weightless RMSNorms on dt, B and C with their own eps
(``mixer_rms_eps``), which is our ``bcdt_norm`` with ``bcdt_norm_eps``.

``residual_in_fp32`` is accepted either way: seqlab's parameters, and so its residual stream, are float32, which is
what both settings compute for a float32 model (they differ only for half-precision weights).
"""

from __future__ import annotations

from seqlab.errors import ConfigError
from seqlab.interop.hf_common import (
    HFConfig,
    backbone_fields_from_hf,
    backbone_fields_to_hf,
    backbone_pairs,
    mamba_pairs,
)
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
        **backbone_fields_from_hf(hf, tie=True),
        d_state=hf.int("state_size"),
        expand=expand,
        dt_rank=hf.dt_rank("time_step_rank", d),
        bcdt_norm=falcon,
        bcdt_norm_eps=float(hf.get("mixer_rms_eps", 1e-6)) if falcon else None,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    return backbone_pairs(config, mamba_pairs)


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
        **backbone_fields_to_hf(config, "falcon_mamba" if falcon else "mamba"),
        "state_size": config.d_state,
        "intermediate_size": d_inner,
        "time_step_rank": _dt_rank(config),
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
