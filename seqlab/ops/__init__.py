"""The math of seqlab: one function per op, each with ``ref``, ``torch`` and ``triton`` paths.

``backend="auto"`` picks the fastest path usable for the tensors given. Several ops share their module's name
(``seqlab.ops.ssd.ssd``), so the functions are bound here eagerly: importing a submodule later never rebinds
``seqlab.ops.ssd`` to the module.
"""

from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.decode_linear import decode_linear, decode_linear_conv
from seqlab.ops.delta_rule import delta_rule, delta_rule_step
from seqlab.ops.linear_attention import linear_attention, linear_attention_step
from seqlab.ops.mamba_layer import mamba_layer_step
from seqlab.ops.mamba_step import selective_step_dt_proj
from seqlab.ops.mlstm import mlstm, mlstm_quadratic, mlstm_step
from seqlab.ops.registry import backends_table
from seqlab.ops.s4 import fft_conv, hippo_legs, s4d_discretize, s4d_init, s4d_kernel, s4d_step
from seqlab.ops.selective_scan import selective_scan, selective_state_update
from seqlab.ops.ssd import ssd, ssd_quadratic, ssd_state_update

__all__ = [
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_quadratic",
    "ssd_state_update",
    "causal_conv1d",
    "conv_step",
    "selective_step_dt_proj",
    "mamba_layer_step",
    "hippo_legs",
    "s4d_init",
    "s4d_kernel",
    "s4d_discretize",
    "fft_conv",
    "s4d_step",
    "linear_attention",
    "linear_attention_step",
    "delta_rule",
    "delta_rule_step",
    "mlstm",
    "mlstm_quadratic",
    "mlstm_step",
    "decode_linear",
    "decode_linear_conv",
    "backends_table",
]
