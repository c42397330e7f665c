"""Shared pieces of the Hugging Face converters: reading a ``config.json`` strictly, the config fields and weight
names that several architectures share, and the two checkpoint layouts.

Every converter maps config fields one by one and refuses (ConfigError naming the field) whatever would change
the numbers and that seqlab cannot represent. Weight names are listed explicitly, block by block:
``pairs`` are ``(seqlab name, transformers name)`` tuples; the same list serves import and export.

Two layouts cover the supported architectures:
  backbone (MambaForCausalLM, Mamba2ForCausalLM)   ``backbone.{embeddings, layers.i.{norm, mixer.*}, norm_f}``
  decoder  (Llama, Jamba, Bamba)                    ``model.{embed_tokens, layers.i.{input_layernorm,
                                                    self_attn.* | mamba.*, <norm2>, <mlp>.*}, <final norm>}``
both followed by ``lm_head`` unless the embeddings are tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from seqlab.errors import ConfigError
from seqlab.mixers.mlp import default_d_ff

# fields that change the math in some transformers architecture; refused unless at their neutral value
NEUTRAL_FIELDS = {
    "rope_scaling": (None, {}),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "sliding_window": (None,),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "pretraining_tp": (None, 1),
}


def _decode_float(value):
    """transformers writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, (list, tuple)):
        return [_decode_float(v) for v in value]
    return value


@dataclass
class HFConfig:
    """A transformers ``config.json`` (as a dict) with strict accessors whose errors name the field."""

    data: dict
    architecture: str
    source: str = "config.json"
    used: set = field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, default=None):
        self.used.add(name)
        return _decode_float(self.data.get(name, default))

    def require(self, name: str):
        if name not in self.data:
            raise ConfigError(f"{self.source}: {self.architecture} needs the field {name!r}, which is missing")
        return self.get(name)

    def int(self, name: str, default=None) -> int:
        value = self.require(name) if default is None else self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{self.source}: {name} must be a non-negative integer, got {value!r}")
        return value

    def refuse(self, name: str, why: str) -> None:
        raise ConfigError(
            f"{self.source}: {self.architecture} with {name}={self.data.get(name)!r} cannot be represented in seqlab: "
            f"{why}"
        )

    def expect(self, name: str, allowed: tuple, why: str, default=None) -> None:
        """Refuse unless the field (``default`` when absent) is one of ``allowed``."""
        value = self.get(name, default)
        if value not in allowed:
            self.refuse(name, why)

    def check_neutral(self) -> None:
        """Refuse any generic math-changing field that is set away from its neutral value."""
        for name, allowed in NEUTRAL_FIELDS.items():
            if name in self.data and self.get(name) not in allowed:
                self.refuse(name, f"seqlab has no equivalent; it supports only {allowed[0]!r}")

    def check_silu(self, name: str = "hidden_act") -> None:
        self.expect(name, ("silu", "swish"), "seqlab's SSM convolutions and SwiGLU gates use SiLU only", "silu")

    def dt_rank(self, name: str, hidden_size: int) -> int:
        value = self.get(name, "auto")
        if value == "auto":
            return math.ceil(hidden_size / 16)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.source}: {name} must be 'auto' or a positive integer, got {value!r}")
        return value

    def time_step_limit(self, name: str = "time_step_limit") -> None:
        """Mamba-2 clamps softplus(dt + dt_bias) to this range; seqlab's SSD does not clamp."""
        value = self.get(name, [0.0, math.inf])
        if value is None:
            return
        if list(value) != [0.0, math.inf]:
            self.refuse(name, "seqlab's SSD does not clamp the step size; only (0.0, inf) (no clamp) is supported")

    def rope(self, default_fraction: float = 1.0) -> tuple[float, float]:
        """``(rope_theta, partial_rotary_factor)`` from ``rope_parameters`` (transformers >= 5) or the older
        top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``; refuses scaled RoPE."""
        params = self.get("rope_parameters")
        if params is None:
            params = {
                "rope_theta": self.get("rope_theta", 10000.0),
                "rope_type": "default",
                "partial_rotary_factor": self.get("partial_rotary_factor", default_fraction),
            }
        if not isinstance(params, dict) or "rope_theta" not in params:
            self.refuse("rope_parameters", "expected one flat dict with rope_theta (no per-layer-type RoPE)")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            self.refuse("rope_parameters", f"rope_type {rope_type!r} (scaled RoPE) is not implemented; only 'default'")
        return float(params["rope_theta"]), float(params.get("partial_rotary_factor", default_fraction))


# ------------------------------------------------------------------------------------------- weight names


def mamba_pairs(s: str, h: str, config) -> list[tuple[str, str]]:
    """Mamba-1 mixer (transformers MambaMixer / FalconMambaMixer / JambaMambaMixer): the names match ours;
    ``conv1d.weight`` is (d_inner, 1, d_conv) on both sides, ``A_log`` (d_inner, d_state), ``x_proj`` packs
    [dt, B, C]. Jamba's learnable ``dt/b/c_layernorm`` are our ``dt_norm``, ``B_norm``, ``C_norm``."""
    names = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
             "out_proj.weight"]
    pairs = [(s + n, h + n) for n in names + _ssm_bias_names(config)]
    if config.bcdt_norm and config.bcdt_norm_weight:
        pairs += [(s + "dt_norm.weight", h + "dt_layernorm.weight"), (s + "B_norm.weight", h + "b_layernorm.weight"),
                  (s + "C_norm.weight", h + "c_layernorm.weight")]
    return pairs


def mamba2_pairs(s: str, h: str, config) -> list[tuple[str, str]]:
    """Mamba-2 mixer (Mamba2Mixer / BambaMixer): same names; ``in_proj`` rows are [z, xBC, dt] on both sides,
    ``conv1d.weight`` (d_inner + 2 G N, 1, d_conv), ``norm.weight`` the gated RMSNorm (per group)."""
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    return [(s + n, h + n) for n in names + _ssm_bias_names(config)]


def _ssm_bias_names(config) -> list[str]:
    """The optional biases both SSM mixers share: in/out projections (``proj_bias``), convolution (``conv_bias``)."""
    names = ["in_proj.bias", "out_proj.bias"] if config.proj_bias else []
    return names + ["conv1d.bias"] if config.conv_bias else names


def attention_pairs(s: str, h: str) -> list[tuple[str, str]]:
    """q/k/v/o without bias. Both sides rotate with the "rotate-half" pairing (channel i with i + d/2) and the
    head-major row layout of Llama checkpoints, so the q/k rows need no permutation."""
    return [(s + n, h + n) for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")]


def swiglu_pairs(s: str, h: str) -> list[tuple[str, str]]:
    return [(s + n, h + n) for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]


def moe_pairs(s: str, h: str, n_experts: int) -> list[tuple[str, str]]:
    """Router + experts in the per-expert layout of published Jamba checkpoints."""
    pairs = [(s + "router.weight", h + "router.weight")]
    for e in range(n_experts):
        pairs += swiglu_pairs(f"{s}experts.{e}.", f"{h}experts.{e}.")
    return pairs


def head_pairs(config) -> list[tuple[str, str]]:
    """The output projection, stored only when it is not tied to the embedding."""
    return [] if config.tie_embeddings else [("lm_head.weight", "lm_head.weight")]


def backbone_pairs(config, mixer_pairs) -> list[tuple[str, str]]:
    """Every weight of a backbone-layout checkpoint; ``mixer_pairs(s, h, config)`` names one mixer's weights."""
    out = [("embedding.weight", "backbone.embeddings.weight"), ("norm_f.weight", "backbone.norm_f.weight")]
    for i in range(config.n_layers):
        out.append((f"layers.{i}.norm.weight", f"backbone.layers.{i}.norm.weight"))
        out += mixer_pairs(f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer.", config)
    return out + head_pairs(config)


def decoder_pairs(config, *, norm_f: str, norm2: str, mlp: str, ssm_pairs=None) -> list[tuple[str, str]]:
    """Every weight of a decoder-layout checkpoint: layers of kind "A" hold ``self_attn``, the others ``mamba``
    (named by ``ssm_pairs(s, h, config)``); the feed-forward block ``<mlp>`` is MoE where
    ``config.channel_mixer(i) == "moe"``, SwiGLU elsewhere."""
    out = [("embedding.weight", "model.embed_tokens.weight"), ("norm_f.weight", f"model.{norm_f}.weight")]
    for i, kind in enumerate(config.layer_kinds()):
        s, h = f"layers.{i}.", f"model.layers.{i}."
        out += [(s + "norm.weight", h + "input_layernorm.weight"), (s + "norm2.weight", h + f"{norm2}.weight")]
        if kind == "A":
            out += attention_pairs(s + "mixer.", h + "self_attn.")
        else:
            out += ssm_pairs(s + "mixer.", h + "mamba.", config)
        if config.channel_mixer(i) == "moe":
            out += moe_pairs(s + "mlp.", f"{h}{mlp}.", config.n_experts)
        else:
            out += swiglu_pairs(s + "mlp.", f"{h}{mlp}.")
    return out + head_pairs(config)


# ------------------------------------------------------------------------------------------- config fields


def shared_fields_from_hf(hf: HFConfig, *, tie: bool, norm_eps_name: str, norm_eps: float, init_range: float) -> dict:
    """ModelConfig fields every architecture reads alike (the defaults are the architecture's): the vocabulary kept
    exactly (no padding rows), the tied head, the norms' eps and the init scale."""
    return dict(
        vocab_size=hf.int("vocab_size"),
        pad_vocab_to_multiple=1,
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie)),
        norm_eps=float(hf.get(norm_eps_name, norm_eps)),
        initializer_range=float(hf.get("initializer_range", init_range)),
    )


def shared_fields_to_hf(config, model_type: str, norm_eps_name: str) -> dict:
    """The inverse of ``shared_fields_from_hf`` plus the model size and SiLU activation every architecture writes."""
    return {
        "model_type": model_type,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        norm_eps_name: config.norm_eps,
        "initializer_range": config.initializer_range,
        "hidden_act": "silu",
    }


def backbone_fields_from_hf(hf: HFConfig, *, tie: bool) -> dict:
    """Fields MambaConfig and Mamba2Config share: the shared ones, no MLP, the convolution, the dt init range and
    the projection / convolution biases."""
    return dict(
        **shared_fields_from_hf(hf, tie=tie, norm_eps_name="layer_norm_epsilon", norm_eps=1e-5, init_range=0.1),
        rescale_prenorm_residual=bool(hf.get("rescale_prenorm_residual", False)),
        mlp="none",
        d_conv=hf.int("conv_kernel", 4),
        dt_min=float(hf.get("time_step_min", 0.001)),
        dt_max=float(hf.get("time_step_max", 0.1)),
        dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
        conv_bias=bool(hf.get("use_conv_bias", True)),
        proj_bias=bool(hf.get("use_bias", False)),
    )


def backbone_fields_to_hf(config, model_type: str) -> dict:
    """The inverse of ``backbone_fields_from_hf``; the residual stream is float32 (seqlab keeps fp32 parameters)."""
    return {
        **shared_fields_to_hf(config, model_type, "layer_norm_epsilon"),
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.proj_bias,
        "residual_in_fp32": True,
    }


def attention_heads(hf: HFConfig, hidden_size: int) -> int:
    """``num_attention_heads``, refused unless it divides ``hidden_size`` (seqlab's head_dim = d_model / n_heads)."""
    n_heads = hf.int("num_attention_heads")
    if n_heads < 1 or hidden_size % n_heads:
        hf.refuse("num_attention_heads", f"it must divide hidden_size={hidden_size}")
    return n_heads


def decoder_fields_from_hf(hf: HFConfig, n_heads: int, *, norm_eps: float) -> dict:
    """Fields Llama, Jamba and Bamba share: the shared ones (RMSNorm eps ``rms_norm_eps``), the feed-forward width
    and the (grouped-query) attention heads."""
    return dict(
        **shared_fields_from_hf(hf, tie=False, norm_eps_name="rms_norm_eps", norm_eps=norm_eps, init_range=0.02),
        d_ff=hf.int("intermediate_size"),
        n_heads=n_heads,
        n_kv_heads=hf.int("num_key_value_heads", n_heads),
    )


def decoder_fields_to_hf(config, model_type: str) -> dict:
    """The inverse of ``decoder_fields_from_hf``."""
    return {
        **shared_fields_to_hf(config, model_type, "rms_norm_eps"),
        "intermediate_size": default_d_ff(config.d_model) if config.d_ff is None else config.d_ff,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads if config.n_kv_heads is None else config.n_kv_heads,
    }


def rope_to_hf(config, **parameters) -> dict:
    """Default (unscaled) RoPE in both spellings: ``rope_parameters`` (transformers >= 5; ``parameters`` such as
    ``partial_rotary_factor`` go there) and the top-level ``rope_theta`` that older versions read instead."""
    return {
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, **parameters},
    }


def decoder_problems(config, arch: str) -> list[str]:
    """What no decoder-layout architecture can hold: windowed attention, or heads that do not divide d_model."""
    problems = []
    if config.attn_window is not None:
        problems.append(f"attn_window must be None ({arch} attends to the whole prefix), got {config.attn_window}")
    if config.d_model % config.n_heads:
        problems.append(f"n_heads={config.n_heads} must divide d_model={config.d_model}")
    return problems


# ------------------------------------------------------------------------------------------- layer patterns


def layer_period(kinds: list[str], token: str) -> tuple[int, int] | None:
    """The smallest ``(period, offset)`` with ``kinds[i] == token`` exactly when ``i % period == offset``;
    None when no such period exists (e.g. two ``token`` layers in one period)."""
    n = len(kinds)
    hits = [i for i, k in enumerate(kinds) if k == token]
    if not hits:
        return n + 1, n  # offset beyond the last layer: no layer of this kind
    for period in range(1, n + 1):
        offset = hits[0] % period
        if offset == hits[0] and all((kinds[i] == token) == (i % period == offset) for i in range(n)):
            return period, offset
    return None
