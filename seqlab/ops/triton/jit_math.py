"""Elementwise math shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p(u) = u log(1 + u) / ((1 + u) - 1) (Goldberg): keeps the
    relative precision of tiny steps, where log(1 + e^x) loses digits and rounds to 0 below x = -17."""
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    d = v - 1.0
    return tl.maximum(x, 0.0) + tl.where(d == 0.0, u, tl.log(v) * (u / tl.where(d == 0.0, 1.0, d)))
