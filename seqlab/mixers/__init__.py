"""Sequence mixers (one file per family) and channel mixers; every sequence mixer follows ``mixers.base``.

``MIXERS`` maps the pattern tokens of ``ModelConfig.pattern`` to their classes.
"""

from __future__ import annotations

from seqlab.mixers.attention import Attention
from seqlab.mixers.base import MixerState
from seqlab.mixers.mamba import Mamba
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.mlp import SwiGLU
from seqlab.mixers.moe import MoE
from seqlab.mixers.norm import GatedRMSNorm, RMSNorm
from seqlab.mixers.rope import RotaryEmbedding
from seqlab.mixers.s4 import S4

MIXERS = {"A": Attention, "S": S4, "M": Mamba, "M2": Mamba2}

__all__ = [
    "MIXERS",
    "Attention",
    "GatedRMSNorm",
    "Mamba",
    "Mamba2",
    "MixerState",
    "MoE",
    "RMSNorm",
    "RotaryEmbedding",
    "S4",
    "SwiGLU",
]
