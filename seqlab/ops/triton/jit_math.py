"""Elementwise math shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from seqlab.ops._common import triton_interpreting

# Compiled kernels take the special-function unit's log; the interpreter (TRITON_INTERPRET=1, how the CPU tests run
# the kernels) has no libdevice, and takes tl.log. Decided at import, as triton.jit decides whether to interpret.
_SFU_LOG = tl.constexpr(not triton_interpreting())


@triton.jit
def fast_log(x):
    """log(x) for float32 x > 0 in one MUFU.LG2 and a multiply (lg2.approx: error within ~2^-22 of log2 x), where
    tl.log compiles to a ~20-instruction polynomial. The interpreter evaluates tl.log."""
    if _SFU_LOG:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def softplus(x):
    """log(1 + e^x) to float32 precision for any x, with one exp and one log as the plain formula (the selective
    scan evaluates it per channel and time step). Below x = -2 the log of 1 + e^x would lose the digits of e^x
    (it rounds to 0 below x = -17, and tiny steps matter to the A gradient): there the series
    log(1 + u) = u - u²/2 + u³/3 - ... to u⁸ (u <= e^-2: the rest is under 2e-8 relative) replaces it. At and
    above -2 the log's argument is at least 1 + e^-2, where the special-function log keeps ~1e-6 relative."""
    u = tl.exp(tl.minimum(x, 20.0))
    v = tl.minimum(u, 1.0)  # the series' argument where it is used (no overflow where it is not)
    series = v * (1.0 - v * (0.5 - v * (1.0 / 3.0 - v * (0.25 - v * (0.2 - v * (1.0 / 6.0 - v * (1.0 / 7.0
                                                                                                  - v * 0.125)))))))
    return tl.where(x > 20.0, x, tl.where(x < -2.0, series, fast_log(1.0 + u)))
