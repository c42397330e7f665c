"""Shared pieces of the Hugging Face converters: reading a ``config.json`` strictly, and the per-block weight names.

Every converter maps config fields one by one and refuses (ConfigError naming the field) whatever would change
the numbers and that seqlab cannot represent. Weight names are listed explicitly, block by block:
``pairs`` are ``(seqlab name, transformers name)`` tuples; the same list serves import and export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from seqlab.errors import ConfigError

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
    if config.proj_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    if config.conv_bias:
        names.append("conv1d.bias")
    pairs = [(s + n, h + n) for n in names]
    if config.bcdt_norm and config.bcdt_norm_weight:
        pairs += [(s + "dt_norm.weight", h + "dt_layernorm.weight"), (s + "B_norm.weight", h + "b_layernorm.weight"),
                  (s + "C_norm.weight", h + "c_layernorm.weight")]
    return pairs


def mamba2_pairs(s: str, h: str, config) -> list[tuple[str, str]]:
    """Mamba-2 mixer (Mamba2Mixer / BambaMixer): same names; ``in_proj`` rows are [z, xBC, dt] on both sides,
    ``conv1d.weight`` (d_inner + 2 G N, 1, d_conv), ``norm.weight`` the gated RMSNorm (per group)."""
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    if config.proj_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    if config.conv_bias:
        names.append("conv1d.bias")
    return [(s + n, h + n) for n in names]


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
