"""Shared helpers of the ops layer: argument checks, backend selection, and the compute dtype and step size
conventions of the selective SSM ops.

Every op takes ``backend="auto" | "ref" | "torch" | "triton"``. ``ref`` is a plain sequential loop,
``torch`` a parallel/chunked PyTorch algorithm (CPU and GPU, autograd), ``triton`` fused GPU kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from seqlab.errors import BackendUnavailable, InputError

BACKENDS = ("auto", "ref", "torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError("backend", f"one of {BACKENDS}", repr(backend))
    return backend


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor | None) -> bool:
    """Whether Triton kernels can run on these tensors: CUDA tensors, or CPU under the interpreter."""
    if not triton_installed():
        return False
    present = [t for t in tensors if t is not None]
    if all(t.is_cuda for t in present) and present:
        return True
    return triton_interpreting() and all(t.device.type == "cpu" for t in present)


def require_triton(op: str, *tensors: torch.Tensor | None) -> None:
    if not triton_installed():
        raise BackendUnavailable(f"{op}: backend='triton' needs the triton package (pip install triton)")
    if not triton_usable(*tensors):
        raise BackendUnavailable(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
            f"got tensors on {sorted({str(t.device) for t in tensors if t is not None})}"
        )


# The largest sizes the fused kernels are built for: the selective scan holds a (channels x N) state in registers;
# the SSD kernels tile (P x N) chunk states and keep a whole head (P) in one block in their backward.
TRITON_LIMITS = {
    "selective_scan": {"A": ("d_state N", 1, 256)},
    "ssd": {"x": ("headdim P", 3, 128), "B": ("d_state N", 3, 256)},
}


def triton_misfit(op: str, **tensors: torch.Tensor) -> InputError | None:
    """An InputError naming the first tensor too large for ``op``'s Triton kernels, or None when they fit."""
    for name, (what, dim, limit) in TRITON_LIMITS.get(op, {}).items():
        t = tensors.get(name)
        if t is not None and t.shape[dim] > limit:
            return InputError(name, f"{what} <= {limit} for backend='triton' (use backend='torch')",
                              f"{what} = {t.shape[dim]} in shape {tuple(t.shape)}")
    return None


def triton_entry(module: str, name: str, *, required: bool = False):
    """The Triton entry point ``module.name``; None when it cannot be imported here (BackendUnavailable instead
    when ``required``)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        if required:
            raise BackendUnavailable(f"backend='triton': cannot load {module}.{name} ({err})") from err
        return None


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype scans accumulate in: float64 stays float64 (for gradcheck), everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def step_size(delta: torch.Tensor, bias: torch.Tensor | None, softplus: bool, dtype: torch.dtype) -> torch.Tensor:
    """Δ = softplus(delta + bias) (or delta + bias without ``softplus``), in ``dtype``."""
    delta = delta.to(dtype)
    if bias is not None:
        delta = delta + bias.to(dtype)
    return F.softplus(delta) if softplus else delta


def check_tensor(
    name: str,
    t: torch.Tensor | None,
    shape: Sequence[int | None | str] | None = None,
    *,
    optional: bool = False,
    floating: bool = True,
    device: torch.device | None = None,
    complex_ok: bool = False,
) -> None:
    """Raise InputError unless ``t`` matches ``shape`` (None = any size; a str = a named dim, for messages).

    ``shape`` entries are either an int (that size exactly), None (any size) or a label like "L" that is only
    used to describe the expectation; sizes that must agree across tensors are checked by ``check_dim``.
    """
    if t is None:
        if optional:
            return
        raise InputError(name, "a tensor", "None")
    if not isinstance(t, torch.Tensor):
        raise InputError(name, "a torch.Tensor", type(t).__name__)
    if floating and not (t.is_floating_point() or (complex_ok and t.is_complex())):
        expected = "a real or complex floating-point tensor" if complex_ok else "a real floating-point tensor"
        raise InputError(name, expected, f"dtype {t.dtype}")
    if device is not None and t.device.type != device.type:
        raise InputError(name, f"a tensor on {device.type} like the other inputs", f"one on {t.device}")
    if shape is not None:
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        if t.dim() != len(shape):
            raise InputError(name, f"a {len(shape)}-D tensor of shape {want}", f"shape {tuple(t.shape)}")
        for i, s in enumerate(shape):
            if isinstance(s, int) and t.shape[i] != s:
                raise InputError(name, f"shape {want}", f"shape {tuple(t.shape)}")


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, meaning: str) -> None:
    """Raise InputError unless ``t.shape[dim] == size``; ``meaning`` says where ``size`` comes from."""
    if t.shape[dim] != size:
        raise InputError(name, f"size {size} in dim {dim} ({meaning})", f"shape {tuple(t.shape)}")


def check_seq_idx(
    seq_idx: torch.Tensor | None, batch: int, seqlen: int, device: torch.device | None = None, like: str = "x"
) -> None:
    """Raise InputError unless ``seq_idx`` is None or an int (B, L) tensor; with ``device``, also unless it is on
    that device type (the device of the input named ``like``)."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
        raise InputError("seq_idx", "an int32/int64 tensor of shape (B, L)", getattr(seq_idx, "dtype", seq_idx))
    if tuple(seq_idx.shape) != (batch, seqlen):
        raise InputError("seq_idx", f"shape ({batch}, {seqlen})", f"shape {tuple(seq_idx.shape)}")
    if device is not None and seq_idx.device.type != device.type:
        raise InputError("seq_idx", f"a tensor on {device.type} like {like}", f"one on {seq_idx.device}")


def reset_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a new document starts (position t > 0 whose seq_idx differs from t-1)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts
