"""Which paths exist for each op, and which of them can run on this machine (for ``seqlab info``)."""

from __future__ import annotations

import importlib.util

# op -> (paths it has, module holding its Triton kernel or None)
OPS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "selective_scan": (("ref", "torch", "triton"), "seqlab.ops.triton.selective_scan"),
    "selective_state_update": (("ref", "torch", "triton"), "seqlab.ops.triton.decode"),
    "ssd": (("ref", "torch", "triton"), "seqlab.ops.triton.ssd"),
    "ssd_state_update": (("ref", "torch", "triton"), "seqlab.ops.triton.decode"),
    "causal_conv1d": (("ref", "torch", "triton"), "seqlab.ops.triton.conv"),
    "conv_step": (("ref", "torch", "triton"), "seqlab.ops.triton.decode"),
    "selective_step_dt_proj": (("ref", "torch", "triton"), "seqlab.ops.triton.mamba_step"),
    "mamba_layer_step": (("ref", "torch", "triton"), "seqlab.ops.triton.mamba_layer"),
    "s4d_kernel": (("ref", "torch"), None),
    "fft_conv": (("ref", "torch"), None),
    "linear_attention": (("ref", "torch", "triton"), "seqlab.ops.triton.linear_attention"),
    "linear_attention_step": (("ref", "torch", "triton"), "seqlab.ops.triton.decode_families"),
    "delta_rule": (("ref", "torch", "triton"), "seqlab.ops.triton.delta_rule"),
    "delta_rule_step": (("ref", "torch", "triton"), "seqlab.ops.triton.decode_families"),
    "mlstm": (("ref", "torch"), None),
    "mlstm_step": (("ref", "torch"), None),
}


def backends_table() -> dict[str, dict[str, bool]]:
    """op -> {backend: usable here}. Triton counts as usable with CUDA, or on CPU under TRITON_INTERPRET=1."""
    import torch

    from seqlab.ops._common import triton_installed, triton_interpreting

    triton_runs = triton_installed() and (torch.cuda.is_available() or triton_interpreting())
    table = {}
    for op, (paths, kernel_module) in OPS.items():
        kernel_present = kernel_module is not None and importlib.util.find_spec(kernel_module) is not None
        table[op] = {
            "ref": "ref" in paths,
            "torch": "torch" in paths,
            "triton": "triton" in paths and kernel_present and triton_runs,
        }
    return table
