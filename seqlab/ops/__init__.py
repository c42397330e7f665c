"""The math of seqlab: one function per op, each with ``ref``, ``torch`` and ``triton`` paths.

``backend="auto"`` picks the fastest path usable for the tensors given. Modules are imported lazily, so
``from seqlab.ops import ssd`` loads only what it needs.
"""

from __future__ import annotations

import importlib

from seqlab.ops.registry import backends_table

# public name -> module that defines it
_EXPORTS = {
    "selective_scan": "seqlab.ops.selective_scan",
    "selective_state_update": "seqlab.ops.selective_scan",
    "ssd": "seqlab.ops.ssd",
    "ssd_quadratic": "seqlab.ops.ssd",
    "ssd_state_update": "seqlab.ops.ssd",
    "causal_conv1d": "seqlab.ops.conv",
    "conv_step": "seqlab.ops.conv",
    "hippo_legs": "seqlab.ops.s4",
    "s4d_init": "seqlab.ops.s4",
    "s4d_kernel": "seqlab.ops.s4",
    "s4d_discretize": "seqlab.ops.s4",
    "fft_conv": "seqlab.ops.s4",
    "s4d_step": "seqlab.ops.s4",
    "linear_attention": "seqlab.ops.linear_attention",
    "linear_attention_step": "seqlab.ops.linear_attention",
    "delta_rule": "seqlab.ops.delta_rule",
    "delta_rule_step": "seqlab.ops.delta_rule",
}

__all__ = [*_EXPORTS, "backends_table"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'seqlab.ops' has no attribute {name!r}")
