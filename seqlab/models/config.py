"""ModelConfig: every hyper-parameter of a LanguageModel, in one JSON-serialisable dataclass.

Mixers read the fields they need in their ``from_config(config, layer_idx)``; ``models/`` never special-cases a
family. Field groups are prefixed by the mixer that uses them where names would collide.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from seqlab.errors import ConfigError

PATTERN_TOKEN = re.compile(r"M2|R6|R7|RC|XL|M|A|S|G|L")  # longest tokens first
CHANNEL_MIXERS = ("none", "swiglu", "moe")


@dataclass
class ModelConfig:
    # --- the stack ---
    preset: str = "hybrid"
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "M"  # per-layer mixer kinds, e.g. "MMMAMMMM" or "M2 M2 A"; repeated to n_layers if shorter
    vocab_size: int = 259  # byte-level default: 256 bytes + pad, bos, eos
    pad_vocab_to_multiple: int = 8
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True  # GPT-2 / Mamba: out-projections scaled by 1/sqrt(n_layers)
    embed_scale: float = 1.0  # token embeddings multiplied by this (Gemma / RecurrentGemma: sqrt(d_model))
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2 / RecurrentGemma: 30)

    # --- channel mixing after each mixer: "none" | "swiglu" | "moe" ---
    mlp: str = "none"
    d_ff: int | None = None  # None -> 8/3 * d_model rounded up to a multiple of 64 (Llama)
    moe_every: int = 0  # >0: every moe_every-th layer (1-based: layers moe_every-1, 2*moe_every-1, ...) uses MoE
    n_experts: int = 8
    moe_top_k: int = 2
    moe_aux_loss_weight: float = 0.01
    mlp_act: str = "silu"  # gate activation of the gated MLP: silu (SwiGLU) | gelu | gelu_tanh (GeGLU)
    mlp_bias: bool = False  # biases on the gated MLP's three projections (RecurrentGemma)
    moe_renormalize: bool = True  # top-k router weights rescaled to sum 1 (Mixtral); False keeps the softmax (Jamba)

    # --- attention (A) ---
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; between -> GQA
    rope_theta: float = 10000.0
    attn_window: int | None = None  # sliding-window size, None = full causal
    attn_out_bias: bool = False  # bias on the output projection (RecurrentGemma)
    rope_fraction: float = 1.0  # share of each head's channels RoPE rotates (Bamba: 0.5); 0 = no positions (Jamba)

    # --- S4D (S) ---
    s4_d_state: int = 64
    s4_init: str = "legs"  # legs | lin | inv
    s4_dt_min: float = 0.001
    s4_dt_max: float = 0.1
    s4_discretization: str = "zoh"  # zoh | bilinear

    # --- Mamba-1 (M) ---
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" -> ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False
    bcdt_norm: bool = False  # Falcon Mamba: RMSNorm on B, C and dt
    bcdt_norm_weight: bool = False  # Jamba: those three norms have learnable scales (Falcon Mamba's have none)
    bcdt_norm_eps: float | None = None  # eps of those norms; None -> norm_eps

    # --- Mamba-2 / SSD (M2) ---
    ssd_d_state: int = 128
    ssd_headdim: int = 64
    ssd_ngroups: int = 1
    ssd_chunk_size: int = 256

    # --- linear attention (L): "linear" (Katharopoulos et al. 2020) | "gla" (gated linear attention) ---
    la_mode: str = "linear"
    la_chunk_size: int = 64  # also the chunk of RWKV-6's linear attention, RWKV-7's delta rule and mLSTM

    # --- RWKV-6 / RWKV-7 (R6, R7) and RWKV channel mixing (RC); d_ff None -> 3.5 d_model for RC ---
    rwkv_headdim: int = 64
    rwkv_lora_rank: int = 32  # token-shift interpolation (ddlerp) and RWKV-7's a / v low-rank width
    rwkv_decay_rank: int = 64  # data-dependent decay w
    rwkv_gate_rank: int = 128  # RWKV-7 output gate
    rwkv_cmix_receptance: bool = True  # RWKV-6 gates the channel mix with sigmoid(W_r x); RWKV-7 does not

    # --- Griffin recurrent block (G): RG-LRU width (None -> d_model); conv width is d_conv ---
    lru_width: int | None = None
    lru_act: str = "gelu"  # gate-branch activation: gelu | gelu_tanh (RecurrentGemma)
    lru_bias: bool = False  # biases on linear_x, linear_y and out_proj (RecurrentGemma)
    lru_heads: int = 1  # >1: block-diagonal input / recurrence gates with this many blocks (RecurrentGemma)
    lru_reset_input: bool = False  # True: no sqrt(1 - a^2) input scaling at a document's first token (RecurrentGemma)

    # --- mLSTM (XL, xLSTM): up-projection factor; heads are n_heads ---
    mlstm_expand: int = 2

    # --- Zamba: one shared attention+MLP block applied every k layers (0 = none) ---
    shared_attention_every: int = 0

    # --- derived quantities (not fields: the JSON holds only the choices above) ---
    @property
    def vocab_size_padded(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_to_multiple (embedding and head rows)."""
        m = max(1, int(self.pad_vocab_to_multiple or 1))
        return -(-self.vocab_size // m) * m

    def layer_kinds(self) -> list[str]:
        """The mixer token of every layer: ``pattern`` tokenised (see ``PATTERN_TOKEN``, spaces allowed), cycled to
        n_layers."""
        tokens = parse_pattern(self.pattern)
        return [tokens[i % len(tokens)] for i in range(self.n_layers)]

    def channel_mixer(self, layer_idx: int) -> str:
        """"none" | "swiglu" | "moe" for the layer: MoE on layers moe_every-1, 2*moe_every-1, ... (or on every
        layer when mlp="moe" and moe_every=0); the other layers get ``mlp`` ("moe" falls back to "swiglu")."""
        if self.mlp == "none":
            return "none"
        if self.moe_every > 0:
            return "moe" if (layer_idx + 1) % self.moe_every == 0 else "swiglu"
        return self.mlp

    def validate(self) -> ModelConfig:
        """Raise ConfigError naming the field when a value cannot build a model; returns self."""
        for name in ("d_model", "n_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.{name}: expected a positive integer, got {value!r}")
        if self.mlp not in CHANNEL_MIXERS:
            raise ConfigError(f"config.mlp: expected one of {list(CHANNEL_MIXERS)}, got {self.mlp!r}")
        if self.moe_every < 0:
            raise ConfigError(f"config.moe_every: expected >= 0, got {self.moe_every}")
        if self.shared_attention_every < 0:
            raise ConfigError(f"config.shared_attention_every: expected >= 0, got {self.shared_attention_every}")
        self.layer_kinds()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config: file {str(path)!r} does not exist") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"config: {str(path)!r} is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def parse_pattern(pattern: str) -> list[str]:
    """``"M2 M2 A"`` -> ``["M2", "M2", "A"]``; ConfigError naming ``pattern`` on anything else."""
    if not isinstance(pattern, str):
        raise ConfigError(f"config.pattern: expected a string of mixer tokens (M2, M, A, S), got {pattern!r}")
    compact = "".join(pattern.split())
    tokens, pos = [], 0
    while pos < len(compact):
        match = PATTERN_TOKEN.match(compact, pos)
        if match is None:
            raise ConfigError(
                f"config.pattern: unknown mixer token at {compact[pos:]!r} in {pattern!r}; "
                "use M (Mamba), M2 (Mamba-2), A (attention), S (S4D), G (Griffin RG-LRU), L (linear attention), "
                "R6 / R7 (RWKV-6 / RWKV-7 time mixing), RC (RWKV channel mixing), XL (mLSTM), "
                "e.g. 'MMMAMMMM' or 'M2 M2 A'"
            )
        tokens.append(match.group())
        pos = match.end()
    if not tokens:
        raise ConfigError(f"config.pattern: expected at least one mixer token (M2, M, A, S), got {pattern!r}")
    return tokens
