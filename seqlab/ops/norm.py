"""RMSNorm as a function (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

The norm modules (seqlab.mixers.norm) and the decode GEMM's unfused path (seqlab.ops.decode_linear) share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x (..., d)`` normalised over its last dim in float32, scaled by ``weight (d,)`` if given.

    One fused op (one kernel on CUDA): statistics and scaling in float32 (the op upcasts low-precision inputs),
    one rounding to x.dtype at the end. Autocast is off around it: its float32 policy for rms_norm would change
    the dtype of the result.
    """
    with torch.autocast(x.device.type, enabled=False):
        if weight is None or weight.dtype == x.dtype:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
