"""BambaForCausalLM <-> seqlab Mamba-2 + attention hybrid with SwiGLU on every layer.

transformers layout: ``model.embed_tokens``, ``model.layers.i.{input_layernorm, mamba.* | self_attn.*,
pre_ff_layernorm, feed_forward.{gate,up,down}_proj}``, ``model.final_layernorm``, ``lm_head``. Layers listed in
``attn_layer_indices`` are attention, the others Mamba-2: the pattern is written out layer by layer.

Bamba's attention rotates only the first half of each head (``partial_rotary_factor`` = 0.5, fixed by
transformers' BambaConfig), rotate-half pairing within those channels: seqlab's ``rope_fraction``. Refused:
``time_step_limit`` clamps, scaled RoPE, ``attention_bias``, ``mlp_bias``, activations other than SiLU.
"""

from __future__ import annotations

from seqlab.interop.hf_common import (
    HFConfig,
    attention_heads,
    decoder_fields_from_hf,
    decoder_fields_to_hf,
    decoder_pairs,
    decoder_problems,
    mamba2_pairs,
    rope_to_hf,
)
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("BambaForCausalLM",)
MODEL_TYPES = {"bamba": "BambaForCausalLM"}
BAMBA_ROPE_FRACTION = 0.5  # transformers' BambaConfig sets partial_rotary_factor = 0.5 whatever the file says


def config_from_hf(hf: HFConfig) -> ModelConfig:
    hf.check_silu()
    hf.check_neutral()
    hf.time_step_limit()
    d = hf.int("hidden_size")
    n_layers = hf.int("num_hidden_layers")
    n_heads = attention_heads(hf, d)
    expand = hf.int("mamba_expand", 2)
    mamba_heads = hf.int("mamba_n_heads", 128)
    headdim = hf.get("mamba_d_head", "auto")
    if headdim == "auto":
        headdim = expand * d // max(mamba_heads, 1)
    if mamba_heads * headdim != expand * d:
        hf.refuse("mamba_n_heads", f"mamba_n_heads * mamba_d_head must equal mamba_expand * hidden_size = {expand * d}")
    attn = hf.get("attn_layer_indices") or []
    if not isinstance(attn, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in attn):
        hf.refuse("attn_layer_indices", f"expected a list of layer indices in [0, {n_layers})")
    theta, _ = hf.rope(BAMBA_ROPE_FRACTION)
    return ModelConfig(
        preset="hybrid",
        d_model=d,
        n_layers=n_layers,
        pattern=" ".join("A" if i in attn else "M2" for i in range(n_layers)),
        mlp="swiglu",
        **decoder_fields_from_hf(hf, n_heads, norm_eps=1e-5),
        rope_theta=theta,
        rope_fraction=BAMBA_ROPE_FRACTION,
        d_conv=hf.int("mamba_d_conv", 4),
        expand=expand,
        conv_bias=bool(hf.get("mamba_conv_bias", True)),
        proj_bias=bool(hf.get("mamba_proj_bias", False)),
        ssd_d_state=hf.int("mamba_d_state", 256),
        ssd_headdim=headdim,
        ssd_ngroups=hf.int("mamba_n_groups", 1),
        ssd_chunk_size=hf.int("mamba_chunk_size", 256),
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    return decoder_pairs(config, norm_f="final_layernorm", norm2="pre_ff_layernorm", mlp="feed_forward",
                         ssm_pairs=mamba2_pairs)


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    kinds = config.layer_kinds()
    problems = []
    if not set(kinds) <= {"M2", "A"}:
        problems.append(f"pattern may hold only 'M2' and 'A' layers, got {' '.join(kinds)!r}")
    if config.mlp != "swiglu" or config.moe_every:
        problems.append(f"mlp must be 'swiglu' on every layer, got mlp={config.mlp!r} moe_every={config.moe_every}")
    if "A" in kinds and config.rope_fraction != BAMBA_ROPE_FRACTION:
        problems.append(
            f"rope_fraction must be {BAMBA_ROPE_FRACTION} (Bamba rotates half of each head), got {config.rope_fraction}"
        )
    return problems + decoder_problems(config, arch)


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    d_inner = config.expand * config.d_model
    return {
        **decoder_fields_to_hf(config, "bamba"),
        **rope_to_hf(config, partial_rotary_factor=BAMBA_ROPE_FRACTION),
        "attn_layer_indices": [i for i, k in enumerate(config.layer_kinds()) if k == "A"],
        "mamba_n_heads": d_inner // config.ssd_headdim,
        "mamba_d_head": config.ssd_headdim,
        "mamba_n_groups": config.ssd_ngroups,
        "mamba_d_state": config.ssd_d_state,
        "mamba_d_conv": config.d_conv,
        "mamba_expand": config.expand,
        "mamba_chunk_size": config.ssd_chunk_size,
        "mamba_conv_bias": config.conv_bias,
        "mamba_proj_bias": config.proj_bias,
        "attention_bias": False,
        "mlp_bias": False,
    }
