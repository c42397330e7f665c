"""JambaForCausalLM <-> seqlab Mamba + attention hybrid with (MoE) SwiGLU on every layer.

transformers layout: ``model.embed_tokens``, ``model.layers.i.{input_layernorm, mamba.* | self_attn.*,
pre_ff_layernorm, feed_forward.*}``, ``model.final_layernorm``, ``lm_head``. Layer i is attention when
``i % attn_layer_period == attn_layer_offset`` (our pattern, one period long) and has ``num_experts`` experts when
``i % expert_layer_period == expert_layer_offset`` (our ``moe_every`` = period, which puts MoE on layers
period-1, 2 period-1, ...: other offsets are refused).

What Jamba does differently from seqlab's ``jamba`` preset, mapped to config options:
  attention without positional encoding           -> rope_fraction = 0
  learnable RMSNorms on dt, B, C (eps rms_norm_eps) -> bcdt_norm = bcdt_norm_weight = True
  top-k router weights not renormalised           -> moe_renormalize = False
Experts are read from the per-expert layout of published checkpoints (``experts.e.{gate,up,down}_proj``) or
from the fused layout (``experts.gate_up_proj (E, 2 F, d)``, ``experts.down_proj (E, d, F)``); written per expert.
"""

from __future__ import annotations

import torch

from seqlab.interop.hf_common import (
    HFConfig,
    attention_heads,
    decoder_fields_from_hf,
    decoder_fields_to_hf,
    decoder_pairs,
    decoder_problems,
    layer_period,
    mamba_pairs,
)
from seqlab.models.config import ModelConfig

ARCHITECTURES = ("JambaForCausalLM",)
MODEL_TYPES = {"jamba": "JambaForCausalLM"}


def config_from_hf(hf: HFConfig) -> ModelConfig:
    hf.check_silu()
    hf.check_neutral()
    d = hf.int("hidden_size")
    n_layers = hf.int("num_hidden_layers")
    n_heads = attention_heads(hf, d)
    period, offset = hf.int("attn_layer_period", 8), hf.int("attn_layer_offset", 4)
    if period < 1 or offset >= period:
        hf.refuse("attn_layer_offset", f"expected 0 <= attn_layer_offset < attn_layer_period={period}")
    pattern = "".join("A" if i == offset else "M" for i in range(period))
    n_experts = hf.int("num_experts", 16)
    mlp, moe_every = "swiglu", 0
    if n_experts > 1:
        e_period, e_offset = hf.int("expert_layer_period", 2), hf.int("expert_layer_offset", 1)
        if e_period < 1 or e_offset != e_period - 1:
            hf.refuse(
                "expert_layer_offset",
                f"seqlab puts MoE on layers moe_every-1, 2*moe_every-1, ...: the offset must be "
                f"expert_layer_period - 1 = {e_period - 1}",
            )
        mlp, moe_every = "moe", e_period
    return ModelConfig(
        preset="jamba",
        d_model=d,
        n_layers=n_layers,
        pattern=pattern,
        mlp=mlp,
        **decoder_fields_from_hf(hf, n_heads, norm_eps=1e-6),
        moe_every=moe_every,
        n_experts=max(n_experts, 1),
        moe_top_k=min(hf.int("num_experts_per_tok", 2), max(n_experts, 1)),
        moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
        moe_renormalize=False,
        rope_fraction=0.0,
        d_state=hf.int("mamba_d_state", 16),
        d_conv=hf.int("mamba_d_conv", 4),
        expand=hf.int("mamba_expand", 2),
        dt_rank=hf.dt_rank("mamba_dt_rank", d),
        conv_bias=bool(hf.get("mamba_conv_bias", True)),
        proj_bias=bool(hf.get("mamba_proj_bias", False)),
        bcdt_norm=True,
        bcdt_norm_weight=True,
    ).validate()


def pairs(config: ModelConfig) -> list[tuple[str, str]]:
    return decoder_pairs(config, norm_f="final_layernorm", norm2="pre_ff_layernorm", mlp="feed_forward",
                         ssm_pairs=mamba_pairs)


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors (transformers >= 5 in memory) -> the per-expert names of published checkpoints."""
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = out.pop(name), out.pop(prefix + "down_proj")  # (E, 2F, d), (E, d, F)
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2, dim=0)  # (F, d) each: gate first, as the fused forward splits them
            out[f"{prefix}{e}.gate_proj.weight"] = gate
            out[f"{prefix}{e}.up_proj.weight"] = up
            out[f"{prefix}{e}.down_proj.weight"] = down[e]
    return out


def export_problems(config: ModelConfig, arch: str) -> list[str]:
    kinds = config.layer_kinds()
    problems = []
    if not set(kinds) <= {"M", "A"}:
        problems.append(f"pattern may hold only 'M' and 'A' layers, got {''.join(kinds)!r}")
    elif layer_period(kinds, "A") is None:
        problems.append(
            f"pattern must have one attention layer per period (Jamba: i % attn_layer_period == attn_layer_offset), "
            f"got {''.join(kinds)!r}"
        )
    if config.mlp == "none":
        problems.append("mlp must be 'swiglu' or 'moe' (every Jamba layer has a feed-forward block), got 'none'")
    if not (config.bcdt_norm and config.bcdt_norm_weight):
        problems.append("bcdt_norm and bcdt_norm_weight must be True (Jamba: learnable RMSNorms on dt, B, C)")
    if config.bcdt_norm_eps not in (None, config.norm_eps):
        problems.append(f"bcdt_norm_eps must equal norm_eps (Jamba uses rms_norm_eps), got {config.bcdt_norm_eps}")
    if config.rope_fraction != 0.0:
        problems.append(f"rope_fraction must be 0 (Jamba's attention has no positions), got {config.rope_fraction}")
    if config.mlp == "moe" and config.moe_renormalize:
        problems.append("moe_renormalize must be False (Jamba keeps the softmax weights of the top-k experts)")
    return problems + decoder_problems(config, arch)


def config_to_hf(config: ModelConfig, arch: str) -> dict:
    period, offset = layer_period(config.layer_kinds(), "A")
    if config.mlp == "swiglu":
        n_experts, e_period, e_offset = 1, 1, 0
    elif config.moe_every > 0:
        n_experts, e_period, e_offset = config.n_experts, config.moe_every, config.moe_every - 1
    else:
        n_experts, e_period, e_offset = config.n_experts, 1, 0
    return {
        **decoder_fields_to_hf(config, "jamba"),
        "attn_layer_period": period,
        "attn_layer_offset": offset,
        "num_experts": n_experts,
        "num_experts_per_tok": config.moe_top_k if n_experts > 1 else 1,
        "expert_layer_period": e_period,
        "expert_layer_offset": e_offset,
        "router_aux_loss_coef": config.moe_aux_loss_weight,
        "mamba_d_state": config.d_state,
        "mamba_d_conv": config.d_conv,
        "mamba_expand": config.expand,
        "mamba_dt_rank": -(-config.d_model // 16) if config.dt_rank == "auto" else config.dt_rank,
        "mamba_conv_bias": config.conv_bias,
        "mamba_proj_bias": config.proj_bias,
        "use_mamba_kernels": False,
    }
