"""Where the Triton kernel tests run: natively on a CUDA machine, or on the CPU under TRITON_INTERPRET=1
(``make test`` sets it). ``TRITON_MARKS`` is a test module's ``pytestmark``: the ``triton`` marker, and a skip
when neither is there."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                       reason="Triton kernels need CUDA or TRITON_INTERPRET=1"),
]
