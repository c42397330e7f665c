"""Mamba2ForCausalLM <-> seqlab ``mamba2`` (pattern "M2", no MLP).

transformers layout: ``backbone.embeddings``, ``backbone.layers.i.{norm, mixer.*}``, ``backbone.norm_f``,
``lm_head`` (untied by default). The mixer's ``in_proj`` rows are [z (D), xBC (D + 2 G N), dt (H)] and its gated
RMSNorm normalises per group with ``layer_norm_epsilon`` -- both as in seqlab's Mamba2. ``time_step_limit`` other
than (0, inf) clamps the step size, which seqlab's SSD does not do: refused.
"""

from __future__ import annotations

from seqlab.interop.hf_common import (
    HFConfig,
    backbone_fields_from_hf,
    backbone_fields_to_hf,
    backbone_pairs,
    mamba2_pairs,
)
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("Mamba2ForCausalLM",)
MODEL_TYPES = {"mamba2": "Mamba2ForCausalLM"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    hf.check_silu()
    hf.check_neutral()
    hf.time_step_limit()
    d = hf.int("hidden_size")
    expand = hf.int("expand", 2)
    headdim = hf.int("head_dim", 64)
    if hf.has("num_heads") and hf.get("num_heads") * headdim != expand * d:
        hf.refuse("num_heads", f"num_heads * head_dim must equal expand * hidden_size = {expand * d}")
    for name in ("rmsnorm", "rms_norm"):  # mamba_ssm's switch for the gated norm, when a config carries it
        hf.expect(name, (True,), "seqlab's Mamba-2 always applies the gated RMSNorm", True)
    hf.expect("norm_before_gate", (False,), "seqlab's Mamba-2 gates before normalising (norm(y * silu(z)))", False)
    return ModelConfig(
        preset="mamba2",
        d_model=d,
        n_layers=hf.int("num_hidden_layers"),
        pattern="M2",
        **backbone_fields_from_hf(hf, tie=False),
        expand=expand,
        ssd_d_state=hf.int("state_size"),
        ssd_headdim=headdim,
        ssd_ngroups=hf.int("n_groups", 1),
        ssd_chunk_size=hf.int("chunk_size", 256),
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    return backbone_pairs(config, mamba2_pairs)


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    problems = []
    if set(config.layer_kinds()) != {"M2"}:
        problems.append(f"pattern must be all Mamba-2 layers ('M2'), got {' '.join(config.layer_kinds())!r}")
    if config.mlp != "none":
        problems.append(f"mlp must be 'none' ({arch} has no MLP), got {config.mlp!r}")
    return problems


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    d_inner = config.expand * config.d_model
    return {
        **backbone_fields_to_hf(config, "mamba2"),
        "state_size": config.ssd_d_state,
        "head_dim": config.ssd_headdim,
        "num_heads": d_inner // config.ssd_headdim,
        "n_groups": config.ssd_ngroups,
        "chunk_size": config.ssd_chunk_size,
    }
