"""LlamaForCausalLM <-> seqlab ``transformer`` (pattern "A", SwiGLU MLP on every layer).

transformers layout: ``model.embed_tokens``, ``model.layers.i.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``.

RoPE: transformers' Llama rotates channel i with channel i + head_dim/2 ("rotate-half"), and so does
``seqlab.mixers.rope``; the q/k projection rows are therefore copied unchanged (no interleave permutation).
Refused: scaled RoPE (``rope_scaling`` / ``rope_type`` other than default), ``partial_rotary_factor`` (Llama's own
code ignores it: the checkpoint's intent is ambiguous), ``attention_bias``, ``mlp_bias``, a ``head_dim`` other than
hidden_size / num_attention_heads, activations other than SiLU.
"""

from __future__ import annotations

from seqlab.interop.hf_common import (
    HFConfig,
    attention_heads,
    decoder_fields_from_hf,
    decoder_fields_to_hf,
    decoder_pairs,
    decoder_problems,
    rope_to_hf,
)
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = {"llama": "LlamaForCausalLM"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    hf.check_silu()
    hf.check_neutral()
    d = hf.int("hidden_size")
    n_heads = attention_heads(hf, d)
    if hf.get("head_dim") not in (None, d // n_heads):
        hf.refuse("head_dim", f"seqlab's attention uses head_dim = hidden_size / num_attention_heads = {d // n_heads}")
    theta, fraction = hf.rope()
    if fraction != 1.0:
        hf.refuse("rope_parameters", "partial_rotary_factor != 1 (LlamaForCausalLM ignores it; seqlab will not guess)")
    return ModelConfig(
        preset="transformer",
        d_model=d,
        n_layers=hf.int("num_hidden_layers"),
        pattern="A",
        mlp="swiglu",
        **decoder_fields_from_hf(hf, n_heads, norm_eps=1e-6),
        rope_theta=theta,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    return decoder_pairs(config, norm_f="norm", norm2="post_attention_layernorm", mlp="mlp")


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    problems = []
    if set(config.layer_kinds()) != {"A"}:
        problems.append(f"pattern must be all attention layers ('A'), got {''.join(config.layer_kinds())!r}")
    if config.mlp != "swiglu" or config.moe_every:
        problems.append(f"mlp must be 'swiglu' on every layer, got mlp={config.mlp!r} moe_every={config.moe_every}")
    if config.rope_fraction != 1.0:
        problems.append(f"rope_fraction must be 1.0 (Llama rotates every channel), got {config.rope_fraction}")
    return problems + decoder_problems(config, arch)


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    return {
        **decoder_fields_to_hf(config, "llama"),
        **rope_to_hf(config),
        "head_dim": config.d_model // config.n_heads,
        "attention_bias": False,
        "mlp_bias": False,
    }
