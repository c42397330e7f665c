"""Depthwise causal 1-D convolution: the short convolution in front of Mamba's and Mamba-2's SSM.

Every channel d has its own filter of width W (``weight (D, W)``)::

    y_t[d] = act( bias[d] + sum_{k=0}^{W-1} weight[d, k] * x_{t-W+1+k}[d] )

so ``weight[:, -1]`` multiplies the current input: the same convention as ``nn.Conv1d(D, D, W, groups=D,
padding=W-1)`` with the last W-1 outputs cropped. Inputs before the first position come from
``initial_state (B, D, W-1)``, the W-1 inputs preceding the sequence, oldest first (zeros when None).

Glossary: B batch, L sequence length, D channels, W filter width, ``conv_state`` the last W-1 inputs.

Documents packed in one row (``seq_idx (B, L)``): the window never reaches across a document start
(positions of an earlier document count as zero), and ``initial_state`` only feeds the row's first
document. ``final_state`` is the state after the last position, i.e. the last document's own state, exactly
what running that document alone would give.

Paths: ``ref`` (explicit loop over time and taps, float32/float64), ``torch`` (a sum of W shifted products,
masked per tap when documents are packed; autograd), ``triton`` (fused GPU kernel in
``seqlab.ops.triton.conv``). ``conv_step`` is the one-token decode form, updating ``conv_state`` in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import (
    check_backend,
    check_dim,
    check_seq_idx,
    check_tensor,
    require_triton,
    triton_entry,
    triton_usable,
)

ACTIVATIONS = (None, "silu")


# ---------------------------------------------------------------------------------------------------------
# validation and dispatch helpers


def _check_common(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation) -> None:
    """Checks shared by causal_conv1d and conv_step; ``x`` is already known to be a tensor."""
    check_tensor("weight", weight, ("D", "W"), device=x.device)
    if x.is_complex() or weight.is_complex():
        raise InputError("x, weight", "real floating-point tensors", f"dtypes {x.dtype}, {weight.dtype}")
    D = x.shape[-1]
    check_dim("weight", weight, 0, D, "D, the channels of x")
    if weight.shape[1] < 1:
        raise InputError("weight", "filter width W >= 1", f"shape {tuple(weight.shape)}")
    check_tensor("bias", bias, (D,), optional=True, device=x.device)
    if activation not in ACTIVATIONS:
        raise InputError("activation", f"one of {ACTIVATIONS}", repr(activation))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Accumulate in float32 at least (float64 when any input is float64)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_real(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.is_complex():
        raise InputError(name, "a real floating-point tensor", f"dtype {t.dtype}")


def _triton_kernel(op: str, backend: str, x: torch.Tensor, tensors: tuple, entry: tuple[str, str]):
    """The Triton entry point to run, or None for the PyTorch paths: ``backend="triton"`` requires it; ``"auto"``
    takes it on CUDA when Triton is usable and the kernel module imports."""
    if backend == "triton":
        require_triton(op, *tensors)
        return triton_entry(*entry, required=True)
    if backend == "auto" and x.is_cuda and triton_usable(*tensors):
        return triton_entry(*entry)
    return None


def _document_ids(seq_idx: torch.Tensor, width: int) -> torch.Tensor:
    """(B, W-1+L) document number of every input position, the W-1 initial-state slots included.

    Documents are numbered 0, 1, 2, ... from each row's start (a new number wherever seq_idx changes); the
    initial-state slots belong to document 0, so they feed the first document only.
    """
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    doc = starts.cumsum(dim=1)  # (B, L)
    return F.pad(doc, (width - 1, 0), value=0)  # (B, W-1+L)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Depthwise causal convolution of ``x (B, L, D)`` with ``weight (D, W)``.

    Returns ``y (B, L, D)`` in the dtype of ``x``, or ``(y, final_state)`` with ``final_state (B, D, W-1)``
    (the last W-1 inputs, oldest first, dtype of ``x``) when ``return_final_state``.
    """
    check_backend(backend)
    check_tensor("x", x, ("B", "L", "D"))
    _check_common(x, weight, bias, activation)
    Bsz, L, D = x.shape
    W = weight.shape[1]
    check_tensor("initial_state", initial_state, (Bsz, D, W - 1), optional=True, device=x.device)
    _check_real("initial_state", initial_state)
    check_seq_idx(seq_idx, Bsz, L, device=x.device)
    if L < 1:
        raise InputError("x", "at least one position (L >= 1)", f"shape {tuple(x.shape)}")

    entry = ("seqlab.ops.triton.conv", "causal_conv1d_triton")
    kernel = _triton_kernel("causal_conv1d", backend, x, (x, weight, bias, initial_state), entry)
    if kernel is not None:
        y, final_state = kernel(x, weight, bias, activation, initial_state, seq_idx)
    elif backend == "ref":
        y, final_state = causal_conv1d_ref(x, weight, bias, activation, initial_state, seq_idx)
    else:
        y, final_state = causal_conv1d_torch(x, weight, bias, activation, initial_state, seq_idx)
    return (y, final_state) if return_final_state else y


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_state=None, seq_idx=None):
    """Readable loop over time and taps. Returns ``(y (B, L, D), final_state (B, D, W-1))``."""
    Bsz, L, D = x.shape
    W = weight.shape[1]
    dtype = _compute_dtype(x, weight, bias, initial_state)
    xs = x.to(dtype)
    w = weight.to(dtype)
    past = (  # (B, D, W-1): inputs at positions -(W-1) .. -1
        initial_state.to(dtype) if initial_state is not None else x.new_zeros(Bsz, D, W - 1, dtype=dtype)
    )
    doc = _document_ids(seq_idx, W) if seq_idx is not None else None  # (B, W-1+L)

    def input_at(s: int) -> torch.Tensor:  # (B, D) input at position s (s < 0: initial state)
        return xs[:, s] if s >= 0 else past[:, :, W - 1 + s]

    ys = []
    for t in range(L):
        acc = bias.to(dtype).expand(Bsz, D) if bias is not None else xs.new_zeros(Bsz, D)
        for k in range(W):
            s = t - (W - 1) + k
            term = w[:, k] * input_at(s)  # (B, D)
            if doc is not None:
                same_document = doc[:, W - 1 + s] == doc[:, W - 1 + t]  # (B,)
                term = term * same_document.unsqueeze(-1).to(dtype)
            acc = acc + term
        if activation == "silu":
            acc = F.silu(acc)
        ys.append(acc)
    y = torch.stack(ys, dim=1)  # (B, L, D)

    final = [input_at(s) for s in range(L - (W - 1), L)]
    final_state = torch.stack(final, dim=-1) if final else xs.new_zeros(Bsz, D, 0)  # (B, D, W-1)
    if doc is not None:
        last_document = doc[:, L:] == doc[:, -1:]  # (B, W-1): slots holding the last document's inputs
        final_state = final_state * last_document.unsqueeze(1).to(dtype)
    return y.to(x.dtype), final_state.to(x.dtype)


def causal_conv1d_torch(x, weight, bias=None, activation=None, initial_state=None, seq_idx=None):
    """Parallel form: a sum of W shifted products over the state-prefixed input, in the (B, L, D) layout.

    (On CPU this is 2-3x faster than a grouped ``F.conv1d``, which needs the (B, D, L) layout.) With packed
    documents each tap is masked where it would reach into another document. Autograd throughout.
    Returns ``(y (B, L, D), final_state (B, D, W-1))``.
    """
    Bsz, L, D = x.shape
    W = weight.shape[1]
    dtype = _compute_dtype(x, weight, bias, initial_state)
    xs = x.to(dtype)
    if initial_state is not None:
        xpad = torch.cat([initial_state.to(dtype).transpose(1, 2), xs], dim=1)  # (B, W-1+L, D)
    else:
        xpad = F.pad(xs, (0, 0, W - 1, 0))
    w = weight.to(dtype)
    doc = _document_ids(seq_idx, W) if seq_idx is not None else None  # (B, W-1+L)

    y = bias.to(dtype) if bias is not None else None
    for k in range(W):
        # tap k reads position t-(W-1)+k, i.e. xpad[:, k + t]
        term = xpad[:, k : k + L] * w[:, k]  # (B, L, D)
        if doc is not None:
            same_document = doc[:, k : k + L] == doc[:, W - 1 :]  # (B, L)
            term = term * same_document.unsqueeze(-1).to(dtype)
        y = term if y is None else y + term
    if activation == "silu":
        y = F.silu(y)

    final_state = xpad[:, L:].transpose(1, 2)  # (B, D, W-1)
    if doc is not None:
        last_document = (doc[:, L:] == doc[:, -1:]).unsqueeze(1)  # (B, 1, W-1)
        final_state = final_state * last_document.to(dtype)
    # a fresh contiguous tensor: a view would keep the whole padded input alive
    final_state = final_state.to(x.dtype, memory_format=torch.contiguous_format, copy=True)
    return y.to(x.dtype), final_state


# ---------------------------------------------------------------------------------------------------------
# conv_step (decode)


def conv_step(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step: ``x (B, D)`` -> ``y (B, D)``; ``conv_state (B, D, W-1)`` is updated in place.

    Equal to ``causal_conv1d`` applied one position at a time with the state carried.
    """
    check_backend(backend)
    check_tensor("x", x, ("B", "D"))
    _check_common(x, weight, bias, activation)
    Bsz, D = x.shape
    W = weight.shape[1]
    check_tensor("conv_state", conv_state, (Bsz, D, W - 1), device=x.device)
    _check_real("conv_state", conv_state)

    entry = ("seqlab.ops.triton.decode", "conv_step_triton")
    kernel = _triton_kernel("conv_step", backend, x, (conv_state, x, weight, bias), entry)
    if kernel is not None:
        return kernel(conv_state, x, weight, bias, activation)
    if backend == "ref":
        return conv_step_ref(conv_state, x, weight, bias, activation)
    return conv_step_torch(conv_state, x, weight, bias, activation)


def conv_step_ref(conv_state, x, weight, bias=None, activation=None):
    """Loop over the W taps; then shift the state left by one and append ``x``."""
    W = weight.shape[1]
    dtype = _compute_dtype(x, weight, bias, conv_state)
    acc = bias.to(dtype).expand_as(x) if bias is not None else x.new_zeros(x.shape, dtype=dtype)
    for k in range(W - 1):
        acc = acc + weight[:, k].to(dtype) * conv_state[:, :, k].to(dtype)
    acc = acc + weight[:, W - 1].to(dtype) * x.to(dtype)
    if activation == "silu":
        acc = F.silu(acc)
    for k in range(W - 2):
        conv_state[:, :, k] = conv_state[:, :, k + 1]
    if W > 1:
        conv_state[:, :, W - 2] = x
    return acc.to(x.dtype)


def conv_step_torch(conv_state, x, weight, bias=None, activation=None):
    """Vectorised step: one multiply-reduce over the window (state, x)."""
    dtype = _compute_dtype(x, weight, bias, conv_state)
    window = torch.cat([conv_state.to(dtype), x.to(dtype).unsqueeze(-1)], dim=-1)  # (B, D, W)
    y = (window * weight.to(dtype)).sum(dim=-1)  # (B, D)
    if bias is not None:
        y = y + bias.to(dtype)
    if activation == "silu":
        y = F.silu(y)
    conv_state.copy_(window[:, :, 1:])
    return y.to(x.dtype)
