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

from seqlab.interop.hf_common import HFConfig, attention_pairs, swiglu_pairs
from seqlab.mixers.mlp import default_d_ff
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = {"llama": "LlamaForCausalLM"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    hf.check_silu()
    hf.check_neutral()
    d = hf.int("hidden_size")
    n_heads = hf.int("num_attention_heads")
    if n_heads < 1 or d % n_heads:
        hf.refuse("num_attention_heads", f"it must divide hidden_size={d}")
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
        vocab_size=hf.int("vocab_size"),
        pad_vocab_to_multiple=1,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        mlp="swiglu",
        d_ff=hf.int("intermediate_size"),
        n_heads=n_heads,
        n_kv_heads=hf.int("num_key_value_heads", n_heads),
        rope_theta=theta,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    out = [("embedding.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    for i in range(config.n_layers):
        s, h = f"layers.{i}.", f"model.layers.{i}."
        out += [(s + "norm.weight", h + "input_layernorm.weight")]
        out += [(s + "norm2.weight", h + "post_attention_layernorm.weight")]
        out += attention_pairs(s + "mixer.", h + "self_attn.")
        out += swiglu_pairs(s + "mlp.", h + "mlp.")
    if not config.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    return out


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    problems = []
    if set(config.layer_kinds()) != {"A"}:
        problems.append(f"pattern must be all attention layers ('A'), got {''.join(config.layer_kinds())!r}")
    if config.mlp != "swiglu" or config.moe_every:
        problems.append(f"mlp must be 'swiglu' on every layer, got mlp={config.mlp!r} moe_every={config.moe_every}")
    if config.rope_fraction != 1.0:
        problems.append(f"rope_fraction must be 1.0 (Llama rotates every channel), got {config.rope_fraction}")
    if config.attn_window is not None:
        problems.append(f"attn_window must be None (Llama attends to the whole prefix), got {config.attn_window}")
    if config.d_model % config.n_heads:
        problems.append(f"n_heads={config.n_heads} must divide d_model={config.d_model}")
    return problems


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.initializer_range,
        "intermediate_size": default_d_ff(config.d_model) if config.d_ff is None else config.d_ff,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads if config.n_kv_heads is None else config.n_kv_heads,
        "head_dim": config.d_model // config.n_heads,
        "rope_theta": config.rope_theta,  # read by transformers < 5, which ignores rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
