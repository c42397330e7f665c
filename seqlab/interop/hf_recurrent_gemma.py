"""RecurrentGemmaForCausalLM -> seqlab ``griffin`` (Botev et al. 2024, "RecurrentGemma"; De et al. 2024, "Griffin").

Import and export. transformers layout: ``model.embed_tokens``, ``model.layers.i.{temporal_pre_norm, temporal_block,
channel_pre_norm, mlp_block.{gate,up,down}_proj}``, ``model.final_norm``, ``lm_head`` (tied). A temporal block is
``block_types[i % len(block_types)]``: "recurrent" -> Griffin's RG-LRU block (``G``), "attention" -> local MQA
(``A``, window ``attention_window_size``, RoPE on half of each head's channels).

How RecurrentGemma's block maps onto seqlab's config (every option exact in float32):

    embeddings * bf16(sqrt(hidden_size))      embed_scale (the bf16-rounded constant transformers multiplies by)
    logits = 30 tanh(logits / 30)             logit_softcap = logits_soft_cap
    RMSNorm(x) * (1 + w)                      seqlab RMSNorm weight = 1 + w (converted at load)
    GeGLU MLP with biases, d_ff = I / 2       mlp="swiglu", mlp_act="gelu_tanh", mlp_bias=True
    linear_x / linear_y / linear_out biases   lru_bias=True; gelu_pytorch_tanh gate branch: lru_act="gelu_tanh"
    block-diagonal gates (heads, b, b)        lru_heads = num_attention_heads (same (H, b, b) layout)
    log a = -8 r softplus(recurrent_param)    a_param = -recurrent_param (seqlab: log a = -8 r softplus(-a_param))
    no sqrt(1 - a²) at position 0             lru_reset_input=True
    o_proj bias                               attn_out_bias=True

Refused (ConfigError naming the field): ``attention_bias``, activations other than gelu / gelu_pytorch_tanh, a
``head_dim`` other than hidden_size / num_attention_heads, scaled RoPE, block types other than recurrent /
attention.
"""

from __future__ import annotations

import torch

from seqlab.interop.hf_common import HFConfig
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("RecurrentGemmaForCausalLM",)
MODEL_TYPES = {"recurrent_gemma": "RecurrentGemmaForCausalLM"}

_BLOCK_TOKENS = {"recurrent": "G", "attention": "A"}
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    d = hf.int("hidden_size")
    n_layers = hf.int("num_hidden_layers")
    n_heads = hf.int("num_attention_heads")
    if n_heads < 1 or d % n_heads:
        hf.refuse("num_attention_heads", f"must divide hidden_size={d}")
    if hf.get("head_dim") not in (None, d // n_heads):
        hf.refuse("head_dim", f"seqlab's attention uses head_dim = hidden_size / num_attention_heads = {d // n_heads}")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        hf.refuse("hidden_activation", f"supported: {list(_ACTIVATIONS)}")
    hf.expect("attention_bias", (False, None), "seqlab's attention has no q/k/v biases", False)
    block_types = hf.get("block_types", ["recurrent", "recurrent", "attention"])
    if not isinstance(block_types, list) or not block_types or any(b not in _BLOCK_TOKENS for b in block_types):
        hf.refuse("block_types", f"expected a non-empty list of {list(_BLOCK_TOKENS)}")
    pattern = " ".join(_BLOCK_TOKENS[block_types[i % len(block_types)]] for i in range(n_layers))
    lru_width = hf.int("lru_width", d)
    if lru_width % n_heads:
        hf.refuse("lru_width", f"must be a multiple of num_attention_heads={n_heads} (block-diagonal gates)")
    theta, fraction = hf.rope(default_fraction=0.5)
    cap = hf.get("logits_soft_cap")
    intermediate = hf.int("intermediate_size")
    if intermediate < 2:
        hf.refuse("intermediate_size", "the MLP width is intermediate_size // 2, which must be >= 1")
    return ModelConfig(
        preset="griffin",
        d_model=d,
        n_layers=n_layers,
        pattern=pattern,
        vocab_size=hf.int("vocab_size"),
        pad_vocab_to_multiple=1,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # transformers keeps sqrt(hidden_size) as a bfloat16 buffer: the model multiplies by its rounded value
        embed_scale=float(torch.tensor(d**0.5, dtype=torch.bfloat16)),
        logit_softcap=None if cap is None else float(cap),
        mlp="swiglu",
        d_ff=intermediate // 2,
        mlp_act=_ACTIVATIONS[act],
        mlp_bias=True,
        n_heads=n_heads,
        n_kv_heads=hf.int("num_key_value_heads", n_heads),
        rope_theta=theta,
        rope_fraction=fraction,
        attn_window=hf.int("attention_window_size"),
        attn_out_bias=True,
        d_conv=hf.int("conv1d_width", 4),
        lru_width=lru_width,
        lru_act=_ACTIVATIONS[act],
        lru_bias=True,
        lru_heads=n_heads,
        lru_reset_input=True,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(seqlab name, transformers name) of every tensor."""
    out = [("embedding.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.final_norm.weight")]
    if not config.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    for i, kind in enumerate(config.layer_kinds()):
        s, h = f"layers.{i}", f"model.layers.{i}"
        out += [(f"{s}.norm.weight", f"{h}.temporal_pre_norm.weight"),
                (f"{s}.norm2.weight", f"{h}.channel_pre_norm.weight")]
        out += [(f"{s}.mlp.{p}.{w}", f"{h}.mlp_block.{p}.{w}")
                for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")]
        t = f"{h}.temporal_block"
        if kind == "A":
            out += [(f"{s}.mixer.{p}.weight", f"{t}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            out.append((f"{s}.mixer.o_proj.bias", f"{t}.o_proj.bias"))
        else:
            out += [(f"{s}.mixer.{p}.{w}", f"{t}.{p}.{w}")
                    for p in ("linear_x", "linear_y") for w in ("weight", "bias")]
            out += [(f"{s}.mixer.out_proj.{w}", f"{t}.linear_out.{w}") for w in ("weight", "bias")]
            out += [(f"{s}.mixer.conv1d.{w}", f"{t}.conv_1d.{w}") for w in ("weight", "bias")]
            out += [(f"{s}.mixer.gate_x.weight", f"{t}.rg_lru.input_gate_weight"),
                    (f"{s}.mixer.gate_x.bias", f"{t}.rg_lru.input_gate_bias"),
                    (f"{s}.mixer.gate_a.weight", f"{t}.rg_lru.recurrent_gate_weight"),
                    (f"{s}.mixer.gate_a.bias", f"{t}.rg_lru.recurrent_gate_bias"),
                    (f"{s}.mixer.a_param", f"{t}.rg_lru.recurrent_param")]
    return out


def tensors_from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RecurrentGemma's parametrisations in seqlab's: norm weights w -> 1 + w, recurrent_param -> -recurrent_param."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("_norm.weight", "final_norm.weight")):
            t = 1.0 + t.float()
        elif name.endswith("rg_lru.recurrent_param"):
            t = -t.float()
        out[name] = t
    return out


def tensors_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``tensors_from_hf`` (on transformers names)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("_norm.weight", "final_norm.weight")):
            t = t - 1.0
        elif name.endswith("rg_lru.recurrent_param"):
            t = -t
        out[name] = t
    return out


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    """Every field that keeps this config from being exactly a RecurrentGemmaForCausalLM."""
    problems = []
    kinds = config.layer_kinds()
    if not set(kinds) <= set(_BLOCK_TOKENS.values()):
        problems.append(f"pattern must hold only G and A layers, got {''.join(kinds)!r}")
    if config.mlp != "swiglu" or config.moe_every:
        problems.append(f"mlp must be the gated MLP on every layer, got mlp={config.mlp!r} "
                        f"moe_every={config.moe_every}")
    if config.mlp_act != "gelu_tanh" or config.lru_act != "gelu_tanh":
        problems.append(f"mlp_act and lru_act must be 'gelu_tanh', got {config.mlp_act!r} / {config.lru_act!r}")
    flags = dict(mlp_bias=config.mlp_bias, lru_bias=config.lru_bias, attn_out_bias=config.attn_out_bias,
                 lru_reset_input=config.lru_reset_input)
    problems += [f"{name} must be True" for name, value in flags.items() if not value]
    if config.lru_heads != config.n_heads:
        problems.append(f"lru_heads must equal n_heads={config.n_heads}, got {config.lru_heads}")
    scale = float(torch.tensor(config.d_model**0.5, dtype=torch.bfloat16))
    if config.embed_scale != scale:
        problems.append(f"embed_scale must be bf16(sqrt(d_model)) = {scale}, got {config.embed_scale}")
    if config.logit_softcap is None:
        problems.append("logit_softcap must be set (RecurrentGemma always soft-caps its logits)")
    if config.attn_window is None and "A" in kinds:
        problems.append("attn_window must be set (RecurrentGemma's attention is local)")
    if config.d_ff is None:
        problems.append("d_ff must be set explicitly (intermediate_size = 2 d_ff)")
    return problems


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    tokens = {token: name for name, token in _BLOCK_TOKENS.items()}
    return {
        "model_type": "recurrent_gemma",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "block_types": [tokens[k] for k in config.layer_kinds()],
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "rms_norm_eps": config.norm_eps,
        "logits_soft_cap": config.logit_softcap,
        "intermediate_size": 2 * config.d_ff,
        "hidden_activation": "gelu_pytorch_tanh",
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads or config.n_heads,
        "head_dim": config.d_model // config.n_heads,
        "attention_window_size": config.attn_window or 2048,
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": config.rope_fraction},
        "conv1d_width": config.d_conv,
        "lru_width": config.lru_width or config.d_model,
    }
