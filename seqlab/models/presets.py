"""Named model families at named sizes: ``preset_config(name, size, **overrides)`` / ``from_preset(...)``.

A preset is a set of ModelConfig fields (the family) plus a table of sizes (the shape). Sizes:

    tiny   tests: d_model 32-64, a few layers, builds and runs in milliseconds
    small  CPU experiments: ~1-5M parameters with the byte vocabulary
    130m, 370m, 790m, 1.4b, 2.8b   published Mamba shapes (Gu & Dao 2023, Table 12)
    130m, 370m, 780m, 1.3b, 2.7b   published Mamba-2 shapes (Dao & Gu 2024)
    130m, 370m, 1.3b               Transformer++ (Llama-style) baselines at GPT-3 shapes
    7b (falcon-mamba), 52b (jamba) the released models' shapes

Published sizes count parameters for a 50280-token vocabulary (GPT-NeoX tokenizer padded to a multiple of 8):
pass ``vocab_size=50280`` to reproduce them; the default is the 259-token byte vocabulary.
"""

from __future__ import annotations

import dataclasses

from seqlab.errors import ConfigError
from seqlab.models.config import ModelConfig

# family fields shared by every size of a preset
_FAMILY: dict[str, dict] = {
    "transformer": dict(pattern="A", mlp="swiglu"),
    "s4": dict(pattern="S", mlp="swiglu"),
    "mamba": dict(pattern="M", mlp="none"),
    "falcon-mamba": dict(pattern="M", mlp="none", bcdt_norm=True),
    "mamba2": dict(pattern="M2", mlp="none"),
    # Jamba (Lieber et al. 2024): one attention layer per 8 at index 4, MoE on every other layer
    "jamba": dict(pattern="MMMMAMMM", mlp="moe", moe_every=2, n_experts=16, moe_top_k=2),
    # Zamba (Glorioso et al. 2024): Mamba backbone, one shared attention+MLP block every 6 layers
    "zamba": dict(pattern="M", mlp="none", shared_attention_every=6),
    "hybrid": dict(mlp="none"),
    # Katharopoulos et al. 2020: elu+1 feature map, normalised, no decay; Llama-style blocks otherwise
    "linear-transformer": dict(pattern="L", mlp="swiglu", la_mode="linear"),
    # RWKV-6 "Finch" (Peng et al. 2024): one RWKV layer = time-mix block + channel-mix block
    "rwkv6": dict(pattern="R6 RC", mlp="none"),
    # Griffin (De et al. 2024): two RG-LRU blocks per local MQA attention block, an MLP after each
    # (SwiGLU here; Griffin uses GeGLU)
    "griffin": dict(pattern="G G A", mlp="swiglu", n_kv_heads=1),
    # xLSTM[1:0] (Beck et al. 2024): mLSTM blocks only, no separate MLP (the block up-projects)
    "mlstm": dict(pattern="XL", mlp="none"),
    # RWKV-7 "Goose" (Peng et al. 2025), simplified onto the gated delta rule (see seqlab.mixers.rwkv7)
    "rwkv7": dict(pattern="R7 RC", mlp="none", rwkv_cmix_receptance=False),
}

# the small shapes every family can share: enough fields for all four mixers to be tiny / small
_TINY = dict(
    d_model=32, n_layers=2, n_heads=2, d_state=8, s4_d_state=8, ssd_d_state=16, ssd_headdim=16, ssd_chunk_size=16
)
_SMALL = dict(
    d_model=128, n_layers=4, n_heads=4, d_state=16, s4_d_state=32, ssd_d_state=32, ssd_headdim=32, ssd_chunk_size=64
)

_MAMBA_SIZES = {
    "130m": dict(d_model=768, n_layers=24),
    "370m": dict(d_model=1024, n_layers=48),
    "790m": dict(d_model=1536, n_layers=48),
    "1.4b": dict(d_model=2048, n_layers=48),
    "2.8b": dict(d_model=2560, n_layers=64),
}
_MAMBA2_SIZES = {
    "130m": dict(d_model=768, n_layers=24),
    "370m": dict(d_model=1024, n_layers=48),
    "780m": dict(d_model=1536, n_layers=48),
    "1.3b": dict(d_model=2048, n_layers=48),
    "2.7b": dict(d_model=2560, n_layers=64),
}
# GPT-3 shapes (Brown et al. 2020, Table 2.1) as Llama-style blocks; d_ff = 8/3 d rounded to 64 keeps the
# parameter count of GPT-3's 4d non-gated MLP
_TRANSFORMER_SIZES = {
    "130m": dict(d_model=768, n_layers=12, n_heads=12),
    "370m": dict(d_model=1024, n_layers=24, n_heads=16),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
}
_MAMBA2_FIELDS = dict(ssd_d_state=128, ssd_headdim=64, ssd_ngroups=1, ssd_chunk_size=256)

_SIZES: dict[str, dict[str, dict]] = {
    "transformer": {
        "tiny": dict(_TINY),
        "small": dict(_SMALL, d_model=192, n_layers=6, n_heads=6),
        **_TRANSFORMER_SIZES,
    },
    "s4": {
        "tiny": dict(_TINY),
        "small": dict(_SMALL, d_model=192, n_layers=6),
    },
    "mamba": {"tiny": dict(_TINY), "small": dict(_SMALL, d_model=256, n_layers=6), **_MAMBA_SIZES},
    "falcon-mamba": {
        "tiny": dict(_TINY),
        "small": dict(_SMALL, d_model=256, n_layers=6),
        **_MAMBA_SIZES,
        # tiiuae/falcon-mamba-7b: 64 layers of d 4096, 65024-token vocabulary, untied head
        "7b": dict(d_model=4096, n_layers=64, vocab_size=65024, tie_embeddings=False),
    },
    "mamba2": {
        "tiny": dict(_TINY),
        "small": dict(_SMALL, d_model=256, n_layers=6),
        **{k: dict(v, **_MAMBA2_FIELDS) for k, v in _MAMBA2_SIZES.items()},
    },
    "jamba": {
        # 8 layers so that the attention layer (index 4) is present even at tiny size
        "tiny": dict(_TINY, n_layers=8, n_experts=4, moe_top_k=2),
        "small": dict(_SMALL, n_layers=8, n_experts=4, moe_top_k=2),
        # ai21labs/Jamba-v0.1: 4 blocks of 8 layers, d 4096, GQA 32/8 heads, d_ff 14336, 16 experts top-2
        "52b": dict(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, n_experts=16, moe_top_k=2,
            vocab_size=65536, tie_embeddings=False,
        ),
    },
    "zamba": {
        "tiny": dict(_TINY, n_layers=4, shared_attention_every=2),
        "small": dict(_SMALL, d_model=192, n_layers=12),
    },
    # tiny: RWKV head sizes that fit d_model=32, so that any pattern builds (as the rwkv6/rwkv7 tiny presets)
    "hybrid": {
        "tiny": dict(_TINY, rwkv_headdim=16, rwkv_lora_rank=8, rwkv_decay_rank=8, rwkv_gate_rank=8),
        "small": dict(_SMALL, d_model=192, n_layers=6),
    },
    "linear-transformer": {"tiny": dict(_TINY), "small": dict(_SMALL, d_model=192, n_layers=6, n_heads=6)},
    # n_layers counts blocks: 2 per RWKV layer
    "rwkv6": {
        "tiny": dict(_TINY, n_layers=4, rwkv_headdim=16, rwkv_lora_rank=8, rwkv_decay_rank=8, la_chunk_size=16),
        "small": dict(_SMALL, d_model=192, n_layers=12, rwkv_headdim=64, rwkv_lora_rank=32, rwkv_decay_rank=64),
    },
    "griffin": {
        "tiny": dict(_TINY, n_layers=3, attn_window=8),
        "small": dict(_SMALL, d_model=192, n_layers=6, n_heads=6, attn_window=128),
    },
    "mlstm": {"tiny": dict(_TINY), "small": dict(_SMALL, d_model=192, n_layers=6, n_heads=4)},
    "rwkv7": {
        "tiny": dict(_TINY, n_layers=4, rwkv_headdim=16, rwkv_lora_rank=8, rwkv_decay_rank=8, rwkv_gate_rank=8,
                     la_chunk_size=16),
        "small": dict(_SMALL, d_model=192, n_layers=12, rwkv_headdim=64, rwkv_lora_rank=32, rwkv_decay_rank=64,
                      rwkv_gate_rank=128),
    },
}

PRESETS: tuple[str, ...] = tuple(_FAMILY)
SIZES: tuple[str, ...] = tuple(dict.fromkeys(size for table in _SIZES.values() for size in table))
_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def sizes_of(name: str) -> tuple[str, ...]:
    """The sizes defined for preset ``name``."""
    _check_name(name)
    return tuple(_SIZES[name])


def preset_config(name: str, size: str = "small", **overrides) -> ModelConfig:
    """The ModelConfig of preset ``name`` at ``size``, with ``overrides`` (ModelConfig fields) applied last."""
    _check_name(name)
    if size not in _SIZES[name]:
        raise ConfigError(f"size: preset {name!r} has sizes {list(_SIZES[name])}, got {size!r}")
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ConfigError(f"overrides: unknown ModelConfig field(s) {unknown}; known fields are {sorted(_FIELDS)}")
    if name == "hybrid" and "pattern" not in overrides:
        raise ConfigError("pattern: preset 'hybrid' needs a layer pattern, e.g. pattern='MMMAMMMM' or 'M2 M2 A'")
    fields = {"preset": name, **_FAMILY[name], **_SIZES[name][size], **overrides}
    return ModelConfig(**fields).validate()


def from_preset(name: str, size: str = "small", **overrides):
    """A freshly initialised LanguageModel of preset ``name`` at ``size`` (see ``preset_config``)."""
    from seqlab.models.language_model import LanguageModel

    return LanguageModel(preset_config(name, size, **overrides))


def _check_name(name: str) -> None:
    if name not in _FAMILY:
        raise ConfigError(f"preset: expected one of {list(PRESETS)}, got {name!r}")
