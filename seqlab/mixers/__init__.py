"""Sequence mixers (one file per family) and channel mixers; every sequence mixer follows ``mixers.base``.

``MIXERS`` maps the pattern tokens of ``ModelConfig.pattern`` to their classes.
"""

from __future__ import annotations

from seqlab.mixers.attention import Attention
from seqlab.mixers.base import MixerState
from seqlab.mixers.gla import LinearAttention
from seqlab.mixers.griffin import GriffinRecurrent
from seqlab.mixers.mamba import Mamba
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.mlp import SwiGLU
from seqlab.mixers.mlstm import MLSTM
from seqlab.mixers.moe import MoE
from seqlab.mixers.norm import GatedRMSNorm, RMSNorm
from seqlab.mixers.rope import RotaryEmbedding
from seqlab.mixers.rwkv6 import RWKV6TimeMix, RWKVChannelMix
from seqlab.mixers.rwkv7 import RWKV7TimeMix
from seqlab.mixers.s4 import S4

MIXERS = {
    "A": Attention,
    "S": S4,
    "M": Mamba,
    "M2": Mamba2,
    "G": GriffinRecurrent,
    "L": LinearAttention,
    "R6": RWKV6TimeMix,
    "R7": RWKV7TimeMix,
    "RC": RWKVChannelMix,
    "XL": MLSTM,
}

__all__ = [
    "MIXERS",
    "MLSTM",
    "Attention",
    "GatedRMSNorm",
    "GriffinRecurrent",
    "LinearAttention",
    "Mamba",
    "Mamba2",
    "MixerState",
    "MoE",
    "RMSNorm",
    "RWKV6TimeMix",
    "RWKV7TimeMix",
    "RWKVChannelMix",
    "RotaryEmbedding",
    "S4",
    "SwiGLU",
]
